/*
 * Anchor for prefork-bench: the smallest preforking HTTP server in C.
 * N forked workers block in accept(2) on one shared socket, read the
 * request, write a fixed response, close. What a preforking server costs
 * with nothing but the kernel's work: the floor the strategies are held to.
 *
 *   cc -O2 -o blocking_accept blocking_accept.c
 *   ./blocking_accept PORT WORKERS      (PORT 0: prints the chosen port)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static const char RESPONSE[] =
    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 19\r\n"
    "Connection: close\r\nX-Worker: 0/0\r\n\r\nHello from prefork\n";

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 0;
    int workers = argc > 2 ? atoi(argv[2]) : 2;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) || listen(fd, 1024)) {
        perror("bind/listen");
        return 1;
    }
    /* As prefork's http app and nginx's `deferred`: wake for the request. */
    setsockopt(fd, IPPROTO_TCP, TCP_DEFER_ACCEPT, &one, sizeof one);
    socklen_t len = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &len);
    printf("prefork ready pid=%d strategy=c-blocking workers=%d listen=127.0.0.1:%d\n",
           getpid(), workers, ntohs(sa.sin_port));
    fflush(stdout);
    signal(SIGPIPE, SIG_IGN);
    pid_t master = getpid();
    for (int i = 0; i < workers; i++) {
        if (fork() == 0) {
            prctl(PR_SET_PDEATHSIG, SIGTERM);
            if (getppid() != master) _exit(0);
            char buf[8192];
            for (;;) {
                int c = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
                if (c < 0) continue;
                if (read(c, buf, sizeof buf) > 0) {
                    ssize_t w = write(c, RESPONSE, sizeof RESPONSE - 1);
                    (void)w;
                }
                close(c);
            }
        }
    }
    signal(SIGTERM, SIG_DFL);
    for (;;) {
        if (wait(NULL) < 0) pause();
    }
}
