/* The usual case of one block's I/O in one call: the system calls of
 * ``block_io.load_block`` and ``block_io.store_block`` without the
 * interpreter between them.
 *
 * Each function does only the case where everything is as expected (a
 * regular file of an allowed owner and the block's size to load; a new name
 * to store under) and returns True when the block moved. Anything else (a
 * missing file, a symlink, a FIFO, a stranger's file, a short read, a full
 * disk, a kernel without openat2) returns False having changed nothing on
 * disk, and the caller does the block again in Python, whose checks decide
 * and word the error. So every refusal and every message has one author,
 * ``block_io``; this file only has to be right about when to step aside.
 *
 * Paths are resolved as ``beneath`` does: openat2 with RESOLVE_BENEATH |
 * RESOLVE_NO_SYMLINKS from the namespace directory's fd, or a directory made
 * here opened one component at a time with O_NOFOLLOW. The GIL is released
 * around every system call, so a worker's lanes overlap their I/O.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdbool.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define DIR_FLAGS (O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
#define READ_FLAGS (O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
#define TEMP_FLAGS (O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC)

/* Until the kernel says ENOSYS; then every call steps aside. Written without the GIL, by any lane. */
static int have_openat2 = 1;

/* openat2 confined below dir_fd; -1 with errno on failure. */
static int open_below(int dir_fd, const char *path, int flags) {
    struct open_how how = {
        .flags = (unsigned long long)flags,
        .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    int fd = (int)syscall(SYS_openat2, dir_fd, path, &how, sizeof how);
    if (fd < 0 && errno == ENOSYS)
        __atomic_store_n(&have_openat2, 0, __ATOMIC_RELAXED);
    return fd;
}

/* The buffer's bytes [offset, offset + nbytes), or NULL with ValueError: a caller's mistake, not a disk's. */
static char *block_bytes(Py_buffer *view, Py_ssize_t offset, Py_ssize_t nbytes) {
    if (offset < 0 || nbytes <= 0 || offset > view->len - nbytes) {
        PyErr_Format(PyExc_ValueError, "block [%zd, %zd) is outside the %zd-byte buffer", offset, offset + nbytes, view->len);
        return NULL;
    }
    return (char *)view->buf + offset;
}

/* Calls ready() if it is not None: 0, or -1 with its exception set. */
static int call_ready(PyObject *ready) {
    if (ready == Py_None)
        return 0;
    PyObject *result = PyObject_CallNoArgs(ready);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

/* 1 if a file of this owner may be loaded (its uid, or a gid of ``gids``), 0 if not, -1 on error. */
static int allowed(const struct stat *st, unsigned long uid, PyObject *gids) {
    if (st->st_uid == uid)
        return 1;
    if (PySet_GET_SIZE(gids) == 0)
        return 0;
    PyObject *gid = PyLong_FromUnsignedLong(st->st_gid);
    if (gid == NULL)
        return -1;
    int found = PySet_Contains(gids, gid);
    Py_DECREF(gid);
    return found;
}

PyDoc_STRVAR(load_doc,
             "load(root, rel, buffer, offset, nbytes, direct, uid, gids, ready) -> bool\n\n"
             "Read the block file ``rel`` below ``root`` into buffer[offset:offset + nbytes] if it is a regular\n"
             "file of uid ``uid`` or a gid in ``gids`` holding exactly ``nbytes``; ``ready()`` runs just before\n"
             "the bytes move. False: not done (those bytes of the buffer may have changed), nothing else touched.");

static PyObject *load(PyObject *module, PyObject *args) {
    int root, direct;
    const char *rel;
    Py_buffer view;
    Py_ssize_t offset, nbytes;
    unsigned long uid;
    PyObject *gids, *ready;
    if (!PyArg_ParseTuple(args, "isw*nnpkO!O:load", &root, &rel, &view, &offset, &nbytes, &direct, &uid, &PyFrozenSet_Type, &gids, &ready))
        return NULL;
    PyObject *outcome = NULL;
    char *block = block_bytes(&view, offset, nbytes);
    if (block == NULL)
        goto done;
    if (!__atomic_load_n(&have_openat2, __ATOMIC_RELAXED))
        goto refuse;
    int fd;
    struct stat st;
    int stat_error;
    Py_BEGIN_ALLOW_THREADS
    fd = open_below(root, rel, READ_FLAGS | (direct ? O_DIRECT : 0));
    stat_error = fd < 0 ? -1 : fstat(fd, &st);
    Py_END_ALLOW_THREADS
    if (fd < 0)
        goto refuse;
    int owner_ok = stat_error == 0 && S_ISREG(st.st_mode) && st.st_size == nbytes ? allowed(&st, uid, gids) : 0;
    if (owner_ok < 0 || (owner_ok == 1 && call_ready(ready) < 0)) {
        close(fd);
        goto done;
    }
    Py_ssize_t got = 0;
    if (owner_ok == 1) {
        Py_BEGIN_ALLOW_THREADS
        while (got < nbytes) {
            ssize_t n = pread(fd, block + got, (size_t)(nbytes - got), got);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                break;
            got += n;
        }
        Py_END_ALLOW_THREADS
    }
    close(fd);
    if (owner_ok == 1 && got == nbytes) {
        outcome = Py_NewRef(Py_True);
        goto done;
    }
refuse:
    outcome = Py_NewRef(Py_False);
done:
    PyBuffer_Release(&view);
    return outcome;
}

/* Opens directory ``path`` below ``root``, making what is missing with ``mode``; sets *made if this call made
 * its last component. -1 with errno on failure. Components are opened one at a time with O_NOFOLLOW, so a
 * symlink put in the way fails (ELOOP or ENOTDIR) and the caller steps aside. */
static int make_dir(int root, const char *path, mode_t mode, bool *made) {
    *made = false;
    int fd = open_below(root, path, DIR_FLAGS);
    if (fd >= 0 || errno != ENOENT)
        return fd;
    char part[NAME_MAX + 1];
    int current = root;
    const char *start = path;
    for (;;) {
        const char *slash = strchr(start, '/');
        size_t len = slash ? (size_t)(slash - start) : strlen(start);
        if (len == 0 || len > NAME_MAX || (len == 1 && start[0] == '.') || (len == 2 && start[0] == '.' && start[1] == '.')) {
            errno = EXDEV;
            fd = -1;
            break;
        }
        memcpy(part, start, len);
        part[len] = '\0';
        /* A parent usually exists and is opened first; the last part usually does not and is made first. */
        fd = slash ? openat(current, part, DIR_FLAGS) : -1;
        if (fd < 0 && (slash == NULL || errno == ENOENT)) {
            if (mkdirat(current, part, mode) == 0)
                *made = slash == NULL;
            else if (errno != EEXIST)
                break;
            fd = openat(current, part, DIR_FLAGS);
        }
        if (fd < 0 || slash == NULL)
            break;
        if (current != root)
            close(current);
        current = fd;
        start = slash + 1;
    }
    if (current != root) {
        int saved = errno;
        close(current);
        errno = saved;
    }
    return fd;
}

PyDoc_STRVAR(store_doc,
             "store(root, dir, name, tmp, buffer, offset, nbytes, direct, file_mode, dir_mode, ready) -> bool\n\n"
             "Write buffer[offset:offset + nbytes] to temp file ``tmp`` in directory ``dir`` below ``root`` (made\n"
             "with ``dir_mode`` where missing) and rename it to ``name``, if nothing is at ``name``; ``ready()``\n"
             "runs just before the bytes are read. False: not stored, and no temp file left (the directories\n"
             "made stay, as a store in Python leaves them).");

static PyObject *store(PyObject *module, PyObject *args) {
    int root, direct, file_mode, dir_mode;
    const char *dir, *name, *tmp;
    Py_buffer view;
    Py_ssize_t offset, nbytes;
    PyObject *ready;
    if (!PyArg_ParseTuple(args, "isssy*nnpiiO:store", &root, &dir, &name, &tmp, &view, &offset, &nbytes, &direct, &file_mode, &dir_mode, &ready))
        return NULL;
    PyObject *outcome = NULL;
    const char *block = block_bytes(&view, offset, nbytes);
    if (block == NULL)
        goto done;
    if (!__atomic_load_n(&have_openat2, __ATOMIC_RELAXED)) {
        outcome = Py_NewRef(Py_False);
        goto done;
    }
    bool made, stored = false;
    int leaf, fd = -1;
    Py_BEGIN_ALLOW_THREADS
    leaf = make_dir(root, dir, (mode_t)dir_mode, &made);
    if (leaf >= 0 && (made || (faccessat(leaf, name, F_OK, AT_SYMLINK_NOFOLLOW) < 0 && errno == ENOENT)))
        fd = openat(leaf, tmp, TEMP_FLAGS | (direct ? O_DIRECT : 0), (mode_t)file_mode);
    Py_END_ALLOW_THREADS
    if (fd >= 0) {
        if (call_ready(ready) < 0) {
            close(fd);
            unlinkat(leaf, tmp, 0);
            close(leaf);
            goto done;
        }
        Py_BEGIN_ALLOW_THREADS
        Py_ssize_t put = 0;
        while (put < nbytes) {
            ssize_t n = pwrite(fd, block + put, (size_t)(nbytes - put), put);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                break;
            put += n;
        }
        int closed = close(fd);
        stored = put == nbytes && closed == 0 && renameat(leaf, tmp, leaf, name) == 0;
        if (!stored)
            unlinkat(leaf, tmp, 0);
        Py_END_ALLOW_THREADS
    }
    if (leaf >= 0)
        close(leaf);
    outcome = Py_NewRef(stored ? Py_True : Py_False);
done:
    PyBuffer_Release(&view);
    return outcome;
}

static PyMethodDef methods[] = {
    {"load", load, METH_VARARGS, load_doc},
    {"store", store, METH_VARARGS, store_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "mp_tier._block_calls",
    .m_doc = "One block's system calls in one call, for the usual case; block_io does the rest.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__block_calls(void) { return PyModule_Create(&module); }
