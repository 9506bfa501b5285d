/*
 * What one wakeup of a sleeping thread costs this host in CPU time: a thread that sleeps in
 * epoll_wait and is woken (a) by its timeout, every millisecond, and (b) by a datagram sent
 * every millisecond by another process, as the media worker is woken by its timers and its
 * socket. Prints the CPU time (user + system, getrusage) per wakeup of each kind.
 *
 *   gcc -O2 -o /tmp/wake_cost bench/wake_cost.c && /tmp/wake_cost
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double cpu_us(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return r.ru_utime.tv_sec * 1e6 + r.ru_utime.tv_usec + r.ru_stime.tv_sec * 1e6 +
           r.ru_stime.tv_usec;
}

int main(void) {
    enum { N = 3000 };
    struct epoll_event ev = {.events = EPOLLIN};
    int ep = epoll_create1(0);

    double c0 = cpu_us();
    for (int i = 0; i < N; i++) epoll_wait(ep, &ev, 1, 1);
    printf("timer wakeup: %.1f us of CPU\n", (cpu_us() - c0) / N);

    int rs = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000001)};
    socklen_t len = sizeof a;
    bind(rs, (struct sockaddr *)&a, sizeof a);
    getsockname(rs, (struct sockaddr *)&a, &len);
    epoll_ctl(ep, EPOLL_CTL_ADD, rs, &ev);
    fflush(stdout);
    pid_t child = fork();
    if (child == 0) {
        int s = socket(AF_INET, SOCK_DGRAM, 0);
        char b[100] = {0};
        struct timespec ms = {0, 1000000};
        for (int i = 0; i < N + 100; i++) {
            nanosleep(&ms, 0);
            sendto(s, b, sizeof b, 0, (struct sockaddr *)&a, sizeof a);
        }
        return 0;
    }
    char buf[2048];
    int got = 0, wakes = 0;
    c0 = cpu_us();
    while (got < N) {
        if (epoll_wait(ep, &ev, 1, -1) <= 0) continue;
        wakes++;
        while (recv(rs, buf, sizeof buf, MSG_DONTWAIT) > 0) got++;
    }
    printf("datagram wakeup: %.1f us of CPU\n", (cpu_us() - c0) / wakes);
    waitpid(child, 0, 0);
    return 0;
}
