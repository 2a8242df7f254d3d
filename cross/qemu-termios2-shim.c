/*
 * Test-only LD_PRELOAD shim for ARM binaries under qemu user-mode emulation.
 *
 * The serial port library (serialport-rs) configures ports with the Linux termios2
 * ioctls (TCGETS2/TCSETS2, for arbitrary baud rates). Every Raspberry Pi kernel has
 * them, but qemu-user's syscall translation did not until late 2025 (Debian bookworm
 * ships qemu 7.2), so under emulation opening any serial port, the demo's pty included,
 * fails with ENOSYS ("Function not implemented"). This shim maps the termios2 ioctls
 * onto TCGETS/TCSETS, which qemu translates, with the speed carried in CBAUD, and
 * answers TIOCGEXCL, which qemu lacks too (see below). It is
 * never shipped: cross/qemu-demo.sh and .ci/run build it with the cross compiler and
 * load it into the emulated process with QEMU_SET_ENV=LD_PRELOAD=...
 *
 * Build: arm-linux-gnueabihf-gcc -shared -fPIC -O2 -o shim.so qemu-termios2-shim.c
 */
#define _GNU_SOURCE
#include <asm/ioctls.h>
#include <asm/termbits.h>
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <string.h>
#include <sys/stat.h>

static const struct {
    unsigned int rate;
    unsigned int code;
} speeds[] = {
    {1200, B1200},     {2400, B2400},     {4800, B4800},     {9600, B9600},
    {19200, B19200},   {38400, B38400},   {57600, B57600},   {115200, B115200},
    {230400, B230400}, {460800, B460800}, {921600, B921600},
};

static unsigned int code_of(unsigned int rate) {
    for (unsigned i = 0; i < sizeof speeds / sizeof speeds[0]; i++)
        if (speeds[i].rate == rate) return speeds[i].code;
    return B38400;
}

static unsigned int rate_of(unsigned int code) {
    for (unsigned i = 0; i < sizeof speeds / sizeof speeds[0]; i++)
        if (speeds[i].code == code) return speeds[i].rate;
    return 38400;
}

typedef int (*ioctl_fn)(int, unsigned long, ...);

/*
 * qemu 7.2 does not translate TIOCGEXCL either (it does TIOCEXCL and TIOCNXCL). The
 * kernel keeps the exclusive flag per tty; the shim remembers what this process set
 * and cleared, per device number, and answers TIOCGEXCL from that. Right for the
 * tests, where the process that opens a port is the one that asks.
 */
#define EXCL_SLOTS 64
static struct {
    dev_t rdev;
    int exclusive;
} excl[EXCL_SLOTS];
static pthread_mutex_t excl_lock = PTHREAD_MUTEX_INITIALIZER;

static int *excl_slot(dev_t rdev, int create) {
    for (int i = 0; i < EXCL_SLOTS; i++)
        if (excl[i].rdev == rdev) return &excl[i].exclusive;
    if (!create) return NULL;
    for (int i = 0; i < EXCL_SLOTS; i++)
        if (excl[i].rdev == 0) {
            excl[i].rdev = rdev;
            return &excl[i].exclusive;
        }
    return NULL;
}

static int tty_rdev(int fd, dev_t *rdev) {
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISCHR(st.st_mode)) return -1;
    *rdev = st.st_rdev;
    return 0;
}

int ioctl(int fd, unsigned long request, ...) {
    static ioctl_fn real;
    if (!real) real = (ioctl_fn)dlsym(RTLD_NEXT, "ioctl");
    va_list ap;
    va_start(ap, request);
    void *arg = va_arg(ap, void *);
    va_end(ap);

    switch (request) {
    case TCGETS2: {
        struct termios t;
        int r = real(fd, TCGETS, &t);
        if (r != 0) return r;
        struct termios2 *t2 = arg;
        memcpy(t2, &t, sizeof t); /* termios2 starts with the termios fields */
        t2->c_ispeed = t2->c_ospeed = rate_of(t.c_cflag & CBAUD);
        return 0;
    }
    case TCSETS2:
    case TCSETSW2:
    case TCSETSF2: {
        const struct termios2 *t2 = arg;
        struct termios t;
        memcpy(&t, t2, sizeof t);
        if ((t.c_cflag & CBAUD) == BOTHER)
            t.c_cflag = (t.c_cflag & ~CBAUD) | code_of(t2->c_ospeed);
        unsigned long plain = request == TCSETS2 ? TCSETS : request == TCSETSW2 ? TCSETSW : TCSETSF;
        return real(fd, plain, &t);
    }
    case TIOCEXCL:
    case TIOCNXCL: {
        int r = real(fd, request);
        dev_t rdev;
        if (r == 0 && tty_rdev(fd, &rdev) == 0) {
            pthread_mutex_lock(&excl_lock);
            int *slot = excl_slot(rdev, 1);
            if (slot) *slot = request == TIOCEXCL;
            pthread_mutex_unlock(&excl_lock);
        }
        return r;
    }
    case TIOCGEXCL: {
        dev_t rdev;
        if (tty_rdev(fd, &rdev) != 0) {
            errno = ENOTTY;
            return -1;
        }
        pthread_mutex_lock(&excl_lock);
        int *slot = excl_slot(rdev, 0);
        *(int *)arg = slot ? *slot : 0;
        pthread_mutex_unlock(&excl_lock);
        return 0;
    }
    default:
        return real(fd, request, arg);
    }
}
