/* A test program for the jail tests, built static so it needs nothing in the image. */
#define _GNU_SOURCE
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
#include <dirent.h>
#include <linux/keyctl.h>
#include <mqueue.h>
#include <pthread.h>
#include <sched.h>
#include <sys/ipc.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/shm.h>
#include <sys/syscall.h>
#include <sys/wait.h>

static void try_open(const char *path, int flags) {
    int fd = open(path, flags, 0644);
    printf("%s %s\n", path, fd >= 0 ? "ok" : strerror(errno));
    if (fd >= 0) close(fd);
}

static void report(const char *what, long r) {
    printf("%s %s\n", what, r >= 0 ? "ok" : strerror(errno));
}

static void *nothing(void *arg) { return arg; }

#define SECRET_KEY 0x6b696c6e

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
    if (!strcmp(mode, "escape")) {
        /* What an attacker tries first: each line is the call and how it ended. */
        report("unshare-user", unshare(CLONE_NEWUSER));
        report("unshare-net", unshare(CLONE_NEWNET));
        long c = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0);
        if (c == 0) _exit(0);
        if (c > 0) waitpid(c, 0, 0);
        report("clone-newuser", c);
        report("clone3", syscall(SYS_clone3, 0, 0));
        report("setns", syscall(SYS_setns, 0, CLONE_NEWNET));
        report("mount", mount("none", "/tmp", "tmpfs", 0, 0));
        report("keyctl", syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 0));
        report("bpf", syscall(SYS_bpf, 0, 0, 0));
        report("perf_event_open", syscall(SYS_perf_event_open, 0, 0, -1, -1, 0));
        report("ptrace", ptrace(PTRACE_TRACEME, 0, 0, 0));
        report("userfaultfd", syscall(SYS_userfaultfd, 0));
        report("vsock", socket(40 /* AF_VSOCK */, SOCK_STREAM, 0));
        report("af_alg", socket(38 /* AF_ALG */, SOCK_SEQPACKET, 0));
        report("unix-socket", socket(AF_UNIX, SOCK_STREAM, 0));
        /* And what a compiler does, which must still work. */
        pid_t p = fork();
        if (p == 0) _exit(0);
        if (p > 0) waitpid(p, 0, 0);
        report("fork", p);
        pthread_t t;
        int e = pthread_create(&t, 0, nothing, 0);
        if (e == 0) pthread_join(t, 0);
        errno = e;
        report("thread", e == 0 ? 0 : -1);
        return 0;
    }
    if (!strcmp(mode, "key-put")) {
        long k = syscall(SYS_add_key, "user", "kiln-secret", argv[2], strlen(argv[2]),
                         KEY_SPEC_USER_KEYRING);
        report("add_key", k);
        long s = syscall(SYS_add_key, "user", "kiln-session", argv[2], strlen(argv[2]),
                         KEY_SPEC_SESSION_KEYRING);
        report("add_key-session", s);
        return 0;
    }
    if (!strcmp(mode, "key-get")) {
        char buf[256] = "";
        const long rings[] = {KEY_SPEC_USER_KEYRING, KEY_SPEC_SESSION_KEYRING};
        const char *names[] = {"kiln-secret", "kiln-session"};
        for (int i = 0; i < 2; i++) {
            long k = syscall(SYS_keyctl, KEYCTL_SEARCH, rings[i], "user", names[i], 0);
            report(names[i], k);
            if (k >= 0) {
                long n = syscall(SYS_keyctl, KEYCTL_READ, k, buf, sizeof buf - 1);
                if (n >= 0) { buf[n < (long)sizeof buf ? n : 0] = 0; printf("read %s\n", buf); }
            }
        }
        return 0;
    }
    if (!strcmp(mode, "ipc-put")) {
        int id = shmget(SECRET_KEY, 4096, IPC_CREAT | 0666);
        report("shmget", id);
        if (id >= 0) {
            char *m = shmat(id, 0, 0);
            if (m != (void *)-1) strcpy(m, argv[2]);
        }
        mqd_t q = mq_open("/kiln-secret", O_CREAT | O_RDWR, 0666, 0);
        report("mq_open", q);
        if (q >= 0) mq_send(q, argv[2], strlen(argv[2]), 0);
        return 0;
    }
    if (!strcmp(mode, "ipc-get")) {
        int id = shmget(SECRET_KEY, 0, 0);
        report("shmget", id);
        if (id >= 0) {
            char *m = shmat(id, 0, 0);
            if (m != (void *)-1) printf("read %s\n", m);
        }
        report("mq_open", mq_open("/kiln-secret", O_RDONLY));
        return 0;
    }
    if (!strcmp(mode, "exit")) return atoi(argv[2]);
    if (!strcmp(mode, "fill")) {
        /* Writes until the disk says no, as a runaway compile would. */
        static char block[1 << 20];
        memset(block, 'x', sizeof block);
        int fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0) { report("open", -1); return 1; }
        long n = 0;
        for (;;) {
            ssize_t w = write(fd, block, sizeof block);
            if (w <= 0) break;
            n += w;
        }
        printf("wrote %ld bytes: %s\n", n, strerror(errno));
        return 1;
    }
    if (!strcmp(mode, "cat")) {
        char buf[4096];
        for (int i = 2; i < argc; i++) {
            int fd = open(argv[i], O_RDONLY);
            if (fd < 0) { report(argv[i], -1); continue; }
            ssize_t n;
            while ((n = read(fd, buf, sizeof buf)) > 0) fwrite(buf, 1, n, stdout);
            close(fd);
        }
        return 0;
    }
    if (!strcmp(mode, "ls")) {
        /* Every name below a directory, one per line, depth first. */
        for (int i = 2; i < argc; i++) {
            DIR *d = opendir(argv[i]);
            if (!d) { report(argv[i], -1); continue; }
            struct dirent *e;
            while ((e = readdir(d))) {
                if (e->d_name[0] == '.') continue;
                char path[4096];
                snprintf(path, sizeof path, "%s/%s", argv[i], e->d_name);
                printf("%s\n", path);
            }
            closedir(d);
        }
        return 0;
    }
    return 100;
}
