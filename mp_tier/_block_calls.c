/* The usual case of a block's I/O without the interpreter between its
 * system calls: ``store`` writes one block as ``block_io.store_block`` does,
 * ``load_run`` loads a task's blocks as ``block_io.load_block`` does each,
 * and ``locate`` makes every block's name, for ``load_run`` and ``layout``.
 *
 * Each does only the case where everything is as expected (a regular file
 * of an allowed owner and the block's size to load; a new name to store
 * under). Anything else (a missing file, a symlink, a FIFO, a stranger's
 * file, a whole block already there, a kernel without openat2) is left to
 * Python, whose checks decide and word the outcome, with nothing on disk
 * changed: ``store`` returns False, ``load_run`` the block's index. Once a
 * store's bytes move (``ready()`` has run), a failing system call raises its
 * OSError naming the block, with the temp file removed: the block is not
 * written twice. A load whose file comes up short is left to Python too (a
 * read changes no file), which reads it again and judges; one whose I/O
 * fails (its read, or the touch after it) is not read again: ``load_run``
 * returns the errno with its index.
 *
 * Paths are resolved as ``beneath`` does: openat2 with RESOLVE_BENEATH |
 * RESOLVE_NO_SYMLINKS from the namespace directory's fd, or a directory made
 * here opened one component at a time with O_NOFOLLOW. The GIL is released
 * around the system calls, so a worker's lanes overlap their I/O.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* openat2's argument and flags, spelled here so that headers older than Linux 5.6 build this too. */
#ifndef SYS_openat2
#define SYS_openat2 437
#endif
struct open_how_v0 {
    uint64_t flags, mode, resolve;
};
#define RESOLVE_NO_MAGICLINKS_ 0x02
#define RESOLVE_NO_SYMLINKS_ 0x04
#define RESOLVE_BENEATH_ 0x08

#define DIR_FLAGS (O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
#define READ_FLAGS (O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
#define TEMP_FLAGS (O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC)
#define MAX_PARTS 16 /* components of a block's directory; the layout uses 2 */

/* Until the kernel says ENOSYS, or a seccomp profile EPERM (as ``beneath`` has it); then every call steps aside.
 * Written without the GIL, by any lane. */
static int have_openat2 = 1;

/* openat2 confined below dir_fd; -1 with errno on failure. */
static int open_below(int dir_fd, const char *path, int flags) {
    struct open_how_v0 how = {
        .flags = (uint64_t)flags,
        .resolve = RESOLVE_BENEATH_ | RESOLVE_NO_SYMLINKS_ | RESOLVE_NO_MAGICLINKS_,
    };
    int fd = (int)syscall(SYS_openat2, dir_fd, path, &how, sizeof how);
    if (fd < 0 && (errno == ENOSYS || errno == EPERM))
        __atomic_store_n(&have_openat2, 0, __ATOMIC_RELAXED);
    return fd;
}

static bool openat2_works(void) { return __atomic_load_n(&have_openat2, __ATOMIC_RELAXED); }

/* The buffer's bytes from ``offset``, or NULL with ValueError: memory safety, whatever the caller checked. */
static char *block_bytes(Py_buffer *view, Py_ssize_t offset, Py_ssize_t nbytes) {
    if (offset < 0 || nbytes <= 0 || offset > view->len - nbytes) {
        PyErr_Format(PyExc_ValueError, "block at offset %zd, %zd bytes, is outside the %zd-byte buffer", offset, nbytes, view->len);
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

/* NULL with the OSError of ``code``, naming ``dir``/``name`` (or ``dir`` alone when ``name`` is NULL). */
static PyObject *os_error(int code, const char *dir, const char *name) {
    PyObject *path = name ? PyUnicode_FromFormat("%s/%s", dir, name) : PyUnicode_FromString(dir);
    if (path != NULL) {
        errno = code;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
        Py_DECREF(path);
    }
    return NULL;
}

/* The layout's name for a block (``layout.locate``): "<hhh>/<hh>_g<group>" in ``dir`` and "<hex>.bin" in
 * ``name``, from a key of at least MIN_KEY bytes (the block hash, then its KV group as 4 big-endian bytes).
 * false if the key is too short or too long to name here. */
#define GROUP_BYTES 4
#define MIN_KEY (GROUP_BYTES + 4)
#define MAX_HASH 108 /* bytes: layout.MAX_KEY_BYTES - GROUP_BYTES, the longest whose temp name fits NAME_MAX */
typedef struct {
    char dir[24], name[2 * MAX_HASH + 5], rel[24 + 2 * MAX_HASH + 5];
} block_name;

static bool name_block(const unsigned char *key, Py_ssize_t length, block_name *out) {
    static const char hex[] = "0123456789abcdef";
    if (length < MIN_KEY || length - GROUP_BYTES > MAX_HASH)
        return false;
    Py_ssize_t hash = length - GROUP_BYTES;
    char *at = out->name;
    for (Py_ssize_t i = 0; i < hash; i++) {
        *at++ = hex[key[i] >> 4];
        *at++ = hex[key[i] & 15];
    }
    memcpy(at, ".bin", 5);
    const unsigned char *g = key + hash;
    unsigned long group = (unsigned long)g[0] << 24 | (unsigned long)g[1] << 16 | (unsigned long)g[2] << 8 | g[3];
    snprintf(out->dir, sizeof out->dir, "%.3s/%.2s_g%lu", out->name, out->name + 3, group);
    snprintf(out->rel, sizeof out->rel, "%s/%s", out->dir, out->name);
    return true;
}

PyDoc_STRVAR(locate_doc,
             "locate(key) -> tuple[str, str]\n\n"
             "The directory (below the namespace directory) and the file name of ``key``'s block: the one place\n"
             "block names are made, so a batch in C and a block in Python never disagree.");

static PyObject *locate(PyObject *module, PyObject *arg) {
    char *key;
    Py_ssize_t length;
    if (PyBytes_AsStringAndSize(arg, &key, &length) < 0)
        return NULL;
    block_name named;
    if (!name_block((const unsigned char *)key, length, &named))
        return PyErr_Format(PyExc_ValueError, "a key of %zd bytes names no block: %d to %d bytes", length, MIN_KEY, MAX_HASH + GROUP_BYTES);
    return Py_BuildValue("(ss)", named.dir, named.name);
}

/* Calls ``hook`` (a callable or None) with the GIL held: 1 if it ran, 0 if it raised an Exception (cleared:
 * the caller steps aside and Python meets it again), -1 if it raised anything else (left set). */
static int call_hook(PyObject *hook) {
    if (call_ready(hook) == 0)
        return 1;
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return -1;
    PyErr_Clear();
    return 0;
}

/* Reads the block open as ``fd`` into ``block`` and, with ``touch``, sets its mtime (a refusal for its owner, or
 * of a read-only mount, counts as done, as ``block_io.note_use`` has it, and so does a file removed since it was
 * opened: ENOENT, or ESTALE from an NFS server another host removed it on; its bytes were read whole); closes
 * ``fd``. LOADED if all of it was read and touched, ASIDE if the file ended early (Python judges that), else the
 * errno of the read or the touch that failed: a block read whole whose touch fails (ENOSPC, EIO) would only fail
 * the same way in Python, after a second read of all its bytes. Runs without the GIL. */
#define LOADED 0
#define ASIDE (-1)
static int read_and_close(int fd, char *block, Py_ssize_t nbytes, int touch) {
    Py_ssize_t got = 0;
    int outcome = LOADED;
    while (got < nbytes && outcome == LOADED) {
        ssize_t n = pread(fd, block + got, (size_t)(nbytes - got), got);
        if (n > 0)
            got += n;
        else if (n == 0)
            outcome = ASIDE;
        else if (errno != EINTR)
            outcome = errno;
    }
    if (outcome == LOADED && touch && futimens(fd, NULL) != 0 && errno != EPERM && errno != EACCES && errno != EROFS &&
        errno != ENOENT && errno != ESTALE)
        outcome = errno;
    close(fd);
    return outcome;
}

/* One block of ``load_run``: what ``read_and_close`` says, or ASIDE before any byte moved; *fatal set if ``hook``
 * raised what must propagate. Called with the GIL held. A file of this uid with no hook to run (most blocks)
 * is opened, checked, read and closed in one release of the GIL. */
static int load_one(int root, const block_name *named, char *block, Py_ssize_t nbytes, int direct, unsigned long uid,
                    PyObject *gids, int touch, PyObject *hook, int *fatal) {
    if (!openat2_works())
        return ASIDE;
    int fd, outcome = ASIDE;
    struct stat st;
    bool usual;
    Py_BEGIN_ALLOW_THREADS
    fd = open_below(root, named->rel, READ_FLAGS | (direct ? O_DIRECT : 0));
    usual = fd >= 0 && fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size == nbytes;
    if (usual && st.st_uid == uid && hook == Py_None) {
        outcome = read_and_close(fd, block, nbytes, touch);
        fd = -1;
    }
    Py_END_ALLOW_THREADS
    if (fd < 0)
        return outcome;
    if (usual && st.st_uid != uid) {
        int owner = allowed(&st, uid, gids);
        if (owner < 0)
            PyErr_Clear(); /* out of memory for a gid: Python judges the block */
        usual = owner == 1;
    }
    if (usual && hook != Py_None) {
        int ran = call_hook(hook);
        *fatal = ran < 0;
        usual = ran == 1;
    }
    Py_BEGIN_ALLOW_THREADS
    if (usual)
        outcome = read_and_close(fd, block, nbytes, touch);
    else
        close(fd);
    Py_END_ALLOW_THREADS
    return outcome;
}

PyDoc_STRVAR(load_run_doc,
             "load_run(root, keys, block_ids, buffer, nbytes, direct, uid, gids, touch, between, hooks, start) -> (int, int)\n\n"
             "Load ``keys[i]``'s block into cache block ``block_ids[i]`` for i from ``start``, each as\n"
             "``block_io.load_block`` would, until one is not the usual case; the index of that block (len(keys) if\n"
             "none) and, if its I/O failed (its read, or the touch after it), that errno (else 0): the caller fails\n"
             "the block with it rather than read it again. Before every block but the task's first, ``between()``\n"
             "runs (its exception propagates); ``hooks``, None or a callable or None per block, is the block's\n"
             "``ready``. With ``touch``, a loaded file's mtime is set (refused for its owner or by a read-only mount,\n"
             "or the file removed since its read: left). A block stepped aside, or whose I/O failed, may have changed its cache bytes, never a file.");

static PyObject *load_run(PyObject *module, PyObject *args) {
    int root, direct, touch;
    PyObject *keys, *ids, *gids, *between, *hooks;
    Py_buffer view;
    Py_ssize_t nbytes, start;
    unsigned long uid;
    if (!PyArg_ParseTuple(args, "iO!O!w*npkO!pOOn:load_run", &root, &PyList_Type, &keys, &PyList_Type, &ids, &view, &nbytes, &direct,
                          &uid, &PyFrozenSet_Type, &gids, &touch, &between, &hooks, &start))
        return NULL;
    PyObject *outcome = NULL;
    Py_ssize_t count = PyList_GET_SIZE(keys), i = start;
    int failed_io = 0;
    if (nbytes <= 0 || start < 0 || PyList_GET_SIZE(ids) != count || (hooks != Py_None && (!PyList_Check(hooks) || PyList_GET_SIZE(hooks) != count))) {
        PyErr_Format(PyExc_ValueError, "load_run needs a block size, a start of 0 or more and as many block ids (and hooks) as keys: "
                     "%zd bytes from block %zd, %zd keys, %zd block ids", nbytes, start, count, PyList_GET_SIZE(ids));
        goto done;
    }
    for (; i < count; i++) {
        if (i > 0 && call_ready(between) < 0)
            goto done;
        /* Python code ran (between, a hook): the lists are read again, and what is used past a call is held. */
        if (i >= PyList_GET_SIZE(keys) || i >= PyList_GET_SIZE(ids) || (hooks != Py_None && i >= PyList_GET_SIZE(hooks)))
            break;
        PyObject *key = PyList_GET_ITEM(keys, i), *id = PyList_GET_ITEM(ids, i);
        Py_ssize_t slot = PyLong_Check(id) ? PyLong_AsSsize_t(id) : -1;
        block_name named;
        if (slot < 0 || slot > PY_SSIZE_T_MAX / nbytes || !PyBytes_Check(key) ||
            !name_block((const unsigned char *)PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), &named))
            break;
        char *block = block_bytes(&view, slot * nbytes, nbytes);
        if (block == NULL)
            break;
        int fatal = 0;
        PyObject *hook = Py_NewRef(hooks == Py_None ? Py_None : PyList_GET_ITEM(hooks, i)); /* held across the GIL's release */
        int loaded = load_one(root, &named, block, nbytes, direct, uid, gids, touch, hook, &fatal);
        Py_DECREF(hook);
        if (fatal)
            goto done;
        if (loaded != LOADED) {
            failed_io = loaded == ASIDE ? 0 : loaded;
            break;
        }
    }
    PyErr_Clear(); /* a block id out of range or too large, a list cut short: Python judges that block */
    outcome = Py_BuildValue("(ni)", i, failed_io);
done:
    PyBuffer_Release(&view);
    return outcome;
}

/* Splits ``path`` into at most MAX_PARTS plain names (none empty, ".", ".." or too long) in ``copy``; the count,
 * or 0 if it is not such a path. Checked whole before anything is made, as ``beneath`` does. */
static int split_plain(const char *path, char *copy, size_t size, char *parts[MAX_PARTS]) {
    size_t length = strlen(path);
    if (length >= size)
        return 0;
    memcpy(copy, path, length + 1);
    int count = 0;
    for (char *start = copy;;) {
        char *slash = strchr(start, '/');
        if (slash != NULL)
            *slash = '\0';
        size_t len = strlen(start);
        if (count == MAX_PARTS || len == 0 || len > NAME_MAX || strcmp(start, ".") == 0 || strcmp(start, "..") == 0)
            return 0;
        parts[count++] = start;
        if (slash == NULL)
            return count;
        start = slash + 1;
    }
}

/* Opens directory ``path`` below ``root``, making what is missing with ``mode``; sets *made if this call made
 * its last component. -1 with errno on failure. A parent usually exists and is opened before it is made; the
 * last part usually does not, and is made before it is opened. Each is opened with O_NOFOLLOW, so a symlink
 * put in the way fails (ELOOP or ENOTDIR) and the caller steps aside. */
static int make_dir(int root, const char *path, mode_t mode, bool *made) {
    *made = false;
    int fd = open_below(root, path, DIR_FLAGS);
    if (fd >= 0 || errno != ENOENT)
        return fd;
    char copy[PATH_MAX], *parts[MAX_PARTS];
    int count = split_plain(path, copy, sizeof copy, parts);
    if (count == 0) {
        errno = EXDEV;
        return -1;
    }
    int current = root;
    for (int i = 0; i < count; i++) {
        bool last = i == count - 1;
        fd = last ? -1 : openat(current, parts[i], DIR_FLAGS);
        if (fd < 0 && (last || errno == ENOENT)) {
            bool new_dir = mkdirat(current, parts[i], mode) == 0;
            *made = new_dir && last;
            fd = new_dir || errno == EEXIST ? openat(current, parts[i], DIR_FLAGS) : -1;
        }
        if (current != root) {
            int saved = errno;
            close(current);
            errno = saved;
        }
        if (fd < 0)
            return -1;
        current = fd;
    }
    return fd;
}

PyDoc_STRVAR(store_doc,
             "store(root, dir, name, tmp, buffer, offset, nbytes, direct, file_mode, dir_mode, ready) -> bool\n\n"
             "Write buffer[offset:offset + nbytes] to temp file ``tmp`` in directory ``dir`` below ``root`` (made\n"
             "with ``dir_mode`` where missing) and rename it to ``name``, if nothing is at ``name``; ``ready()``\n"
             "runs just before the bytes are read. False: not stored, nothing on disk touched but the directories\n"
             "made (as a store in Python leaves them). A write or rename that fails raises its OSError, with the\n"
             "temp file removed.");

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
    if (!openat2_works()) {
        outcome = Py_NewRef(Py_False);
        goto done;
    }
    bool made;
    int leaf, fd = -1, code = 0;
    Py_BEGIN_ALLOW_THREADS
    leaf = make_dir(root, dir, (mode_t)dir_mode, &made);
    if (leaf >= 0 && (made || (faccessat(leaf, name, F_OK, AT_SYMLINK_NOFOLLOW) < 0 && errno == ENOENT)))
        fd = openat(leaf, tmp, TEMP_FLAGS | (direct ? O_DIRECT : 0), (mode_t)file_mode);
    Py_END_ALLOW_THREADS
    bool failed_ready = fd >= 0 && call_ready(ready) < 0;
    Py_BEGIN_ALLOW_THREADS
    if (fd >= 0 && !failed_ready) {
        for (Py_ssize_t put = 0; put < nbytes && code == 0;) {
            ssize_t n = pwrite(fd, block + put, (size_t)(nbytes - put), put);
            if (n > 0)
                put += n;
            else if (n == 0)
                code = EIO; /* no progress: say so rather than loop */
            else if (errno != EINTR)
                code = errno;
        }
        if (close(fd) != 0 && code == 0)
            code = errno; /* a network file system may report a failed write only here */
        if (code == 0 && renameat(leaf, tmp, leaf, name) != 0)
            code = errno;
    }
    if (fd >= 0 && (failed_ready || code != 0)) {
        if (failed_ready)
            close(fd);
        unlinkat(leaf, tmp, 0);
    }
    if (leaf >= 0)
        close(leaf);
    Py_END_ALLOW_THREADS
    if (failed_ready)
        goto done;
    if (code != 0)
        outcome = os_error(code, dir, name);
    else
        outcome = Py_NewRef(fd >= 0 ? Py_True : Py_False);
done:
    PyBuffer_Release(&view);
    return outcome;
}

static PyMethodDef methods[] = {
    {"store", store, METH_VARARGS, store_doc},
    {"locate", locate, METH_O, locate_doc},
    {"load_run", load_run, METH_VARARGS, load_run_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "mp_tier._block_calls",
    .m_doc = "A block's system calls without the interpreter, for the usual case; block_io does the rest.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__block_calls(void) { return PyModule_Create(&module); }
