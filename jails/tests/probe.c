/* A test program for the jail tests, built static so it needs nothing in the image. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void try_open(const char *path, int flags) {
    int fd = open(path, flags, 0644);
    printf("%s %s\n", path, fd >= 0 ? "ok" : strerror(errno));
    if (fd >= 0) close(fd);
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "hello";
    if (!strcmp(mode, "hello")) {
        char host[64] = "";
        gethostname(host, sizeof host);
        printf("uid=%d gid=%d host=%s\n", (int)getuid(), (int)getgid(), host);
        FILE *st = fopen("/proc/self/status", "r");
        char line[256];
        while (st && fgets(line, sizeof line, st))
            if (!strncmp(line, "CapEff:", 7) || !strncmp(line, "CapPrm:", 7) ||
                !strncmp(line, "NoNewPrivs:", 11))
                fputs(line, stdout);
        FILE *out = fopen("out.txt", "w");
        if (out) { fputs("made in the jail\n", out); fclose(out); }
        fprintf(stderr, "to stderr\n");
        return 3;
    }
    if (!strcmp(mode, "net")) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {0};
        a.sin_family = AF_INET;
        a.sin_port = htons(atoi(argv[2]));
        a.sin_addr.s_addr = htonl(0x7f000001);
        int r = connect(s, (struct sockaddr *)&a, sizeof a);
        printf("connect %s\n", r == 0 ? "ok" : strerror(errno));
        return 0;
    }
    if (!strcmp(mode, "read")) {
        for (int i = 2; i < argc; i++) try_open(argv[i], O_RDONLY);
        return 0;
    }
    if (!strcmp(mode, "write")) {
        for (int i = 2; i < argc; i++) try_open(argv[i], O_WRONLY | O_CREAT | O_TRUNC);
        return 0;
    }
    if (!strcmp(mode, "forkbomb")) {
        int n = 0;
        for (;;) {
            pid_t p = fork();
            if (p == 0) { pause(); _exit(0); }
            if (p < 0) break;
            n++;
        }
        printf("forked %d\n", n);
        fflush(stdout);
        for (;;) pause();
    }
    if (!strcmp(mode, "spin")) {
        if (fork() == 0) { setsid(); for (;;) {} }
        for (;;) {}
    }
    if (!strcmp(mode, "alloc")) {
        size_t mb = (size_t)atoi(argv[2]);
        for (size_t i = 0; i < mb; i++) {
            char *p = malloc(1 << 20);
            if (!p) { printf("malloc failed at %zu MiB\n", i); return 1; }
            memset(p, 1, 1 << 20);
        }
        printf("allocated %zu MiB\n", mb);
        return 0;
    }
    if (!strcmp(mode, "symlink")) {
        return symlink(argv[2], argv[3]) == 0 ? 0 : 1;
    }
    return 100;
}
