"""A real GlusterFS volume on this machine, mounted once per simulated node.

mp_tier promises that several nodes can share one root on a distributed file
system. This harness builds that setting from real parts: a ``glusterd`` it
starts with a pidfile, a replica-2 volume on two local bricks, one FUSE mount
per node, and node processes that run in their own UTS namespace (``unshare
--uts``) under their own hostname, so mp_tier's temp-file names and start-up
sweep see distinct hosts. It installs nothing (``.ci/glusterfs`` does).

    python tools/glusterfs_nodes.py [--nodes A,B,C] [--volume NAME] setup [--option KEY=VALUE ...] [--replica N]
    python tools/glusterfs_nodes.py status
    python tools/glusterfs_nodes.py run A -- python -c 'import socket; print(socket.gethostname())'
    python tools/glusterfs_nodes.py teardown

``setup`` and ``teardown`` are idempotent: each step checks what is there
first, and every step it takes is printed. Run as root.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Log = Callable[[str], None]

# Every gluster CLI call is bounded; a healthy one takes well under a second.
CLI_TIMEOUT = 60.0
GLUSTERD_START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


class GlusterUnavailable(RuntimeError):
    """This machine cannot run GlusterFS at all (not root, not installed, no FUSE, mount refused)."""


@dataclass(frozen=True)
class Cluster:
    """Where the volume, its bricks, its mounts and our glusterd's pidfile live."""

    volume: str = "mp_tier_kv"
    # bricks under <bricks_root>/<volume>, mounts under <mounts_root>/<volume>: volumes never share a directory
    bricks_root: str = "/srv"
    mounts_root: str = "/mnt"
    pidfile: str = "/run/mp_tier_glusterd.pid"
    nodes: tuple[str, ...] = ("A", "B", "C")
    options: dict[str, str] = field(default_factory=dict)
    # 2: every block on two bricks, as platform-facts describes; 1: one brick, to measure what replication costs
    replica: int = 2

    @property
    def brick_dir(self) -> str:
        return os.path.join(self.bricks_root, self.volume)

    @property
    def mount_dir(self) -> str:
        return os.path.join(self.mounts_root, self.volume)

    @property
    def bricks(self) -> list[str]:
        return [os.path.join(self.brick_dir, f"b{i}") for i in range(1, self.replica + 1)]

    def mount(self, node: str) -> str:
        """The mount point of ``node``: its view of the shared volume."""
        return os.path.join(self.mount_dir, node)


def hostname(node: str) -> str:
    """The hostname a node's processes see (and put into mp_tier's temp-file names)."""
    return f"node{node}"


def why_unusable() -> str | None:
    """None if this machine can run the volume, else the specific reason."""
    if os.geteuid() != 0:
        return f"GlusterFS needs root (glusterd, bricks with trusted xattrs, FUSE mounts); running as uid {os.geteuid()}"
    for tool in ("glusterd", "gluster", "mount.glusterfs"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: run .ci/glusterfs (apt-get install glusterfs-server glusterfs-client)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is missing: nodes need their own UTS namespace"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing: GlusterFS mounts through FUSE"
    return None


def _gluster(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["gluster", "--mode=script", *args], capture_output=True, text=True, timeout=CLI_TIMEOUT
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"gluster {' '.join(args)}: exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def _comm(pid: int) -> str | None:
    """The command name of a live process; None for a zombie (an exited daemon waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            head, _, rest = f.read().rpartition(")")
    except OSError:
        return None
    return None if rest.split()[0] == "Z" else head.partition("(")[2]


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
    except OSError:
        return []


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _our_glusterd(cluster: Cluster) -> int | None:
    """The pid of the glusterd this harness started, if it still runs."""
    try:
        with open(cluster.pidfile) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid and _comm(pid) == "glusterd" else None


def _any_glusterd() -> int | None:
    return next((pid for pid in _pids() if _comm(pid) == "glusterd"), None)


def wait_gone(pid: int, timeout: float) -> bool:
    """True once ``pid`` has exited (a pidfd: glusterd daemonizes, so it is not our child)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _poll(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {timeout:.0f} s")
        time.sleep(0.05)


def _glusterd_answers() -> bool:
    return _gluster("pool", "list", check=False).returncode == 0


def _mounts() -> dict[str, str]:
    """Mount point -> source of every GlusterFS mount."""
    found = {}
    with open("/proc/mounts") as f:
        for line in f:
            source, point, fstype = line.split()[:3]
            if fstype == "fuse.glusterfs":
                found[point.replace("\\040", " ")] = source
    return found


def _all_mount_points() -> list[str]:
    with open("/proc/mounts") as f:
        return [line.split()[1].replace("\\040", " ") for line in f]


def _volume_exists(cluster: Cluster) -> bool:
    return _gluster("volume", "info", cluster.volume, check=False).returncode == 0


def _volume_started(cluster: Cluster) -> bool:
    info = _gluster("volume", "info", cluster.volume).stdout
    return "Status: Started" in info


def start_glusterd(cluster: Cluster, log: Log = print) -> None:
    """Start glusterd with our pidfile unless one runs; wait until it answers."""
    if (pid := _our_glusterd(cluster)) is not None:
        log(f"glusterd: already running (pid {pid}, ours: {cluster.pidfile})")
    elif (pid := _any_glusterd()) is not None:
        log(f"glusterd: using the one already running (pid {pid}; not ours, so teardown leaves it)")
    else:
        proc = subprocess.run(["glusterd", "-p", cluster.pidfile], capture_output=True, text=True, timeout=CLI_TIMEOUT)
        if proc.returncode != 0:
            raise GlusterUnavailable(f"glusterd refused to start: exit {proc.returncode}: {proc.stderr.strip()}")
        _poll(lambda: _our_glusterd(cluster) is not None, GLUSTERD_START_TIMEOUT, "glusterd pidfile")
        log(f"glusterd: started (pid {_our_glusterd(cluster)}, pidfile {cluster.pidfile})")
    _poll(_glusterd_answers, GLUSTERD_START_TIMEOUT, "glusterd answering 'gluster pool list'")


def setup(cluster: Cluster = Cluster(), log: Log = print) -> Cluster:
    """Bring up glusterd, the volume and one mount per node; skip what is already there."""
    if why := why_unusable():
        raise GlusterUnavailable(why)
    start_glusterd(cluster, log)
    if _volume_exists(cluster):
        log(f"volume {cluster.volume}: already exists")
    else:
        host = socket.gethostname()
        for brick in cluster.bricks:
            os.makedirs(brick, exist_ok=True)
        replica = ["replica", str(cluster.replica)] if cluster.replica > 1 else []
        # force: the bricks sit on the root file system, and replica 2 asks for confirmation
        _gluster("volume", "create", cluster.volume, *replica, *(f"{host}:{b}" for b in cluster.bricks), "force")
        log(f"volume {cluster.volume}: created, replica {cluster.replica} on {', '.join(f'{host}:{b}' for b in cluster.bricks)}")
    for key, value in cluster.options.items():
        _gluster("volume", "set", cluster.volume, key, value)
        log(f"volume {cluster.volume}: set {key} = {value}")
    if _volume_started(cluster):
        log(f"volume {cluster.volume}: already started")
    else:
        _gluster("volume", "start", cluster.volume)
        log(f"volume {cluster.volume}: started")
    mounted = _mounts()
    for node in cluster.nodes:
        point = cluster.mount(node)
        if point in mounted:
            log(f"node {node}: already mounted at {point}")
            continue
        os.makedirs(point, exist_ok=True)
        proc = subprocess.run(
            ["mount", "-t", "glusterfs", f"localhost:/{cluster.volume}", point],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
        )
        if proc.returncode != 0 or point not in _mounts():
            raise GlusterUnavailable(f"mount of localhost:/{cluster.volume} at {point} refused: {(proc.stderr or proc.stdout).strip()}")
        os.listdir(point)  # the client reached the bricks, not only the kernel
        log(f"node {node}: mounted localhost:/{cluster.volume} at {point} (hostname {hostname(node)})")
    return cluster


def _volume_processes(cluster: Cluster) -> list[int]:
    """Bricks and FUSE clients of our volume that outlived their volume or mount."""
    found = []
    for pid in _pids():
        if _comm(pid) not in ("glusterfsd", "glusterfs"):
            continue
        argv = _cmdline(pid)
        ids = [a.partition("=")[2] for a in argv if a.startswith("--volfile-id=")]
        ids += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--volfile-id"]
        # a brick's id is "<volume>.<host>.<brick path>", a client's "/<volume>"
        if any(v.lstrip("/").split(".")[0] == cluster.volume for v in ids):
            found.append(pid)
    return found


def _hooks_running(glusterd: int) -> bool:
    """glusterd runs hook scripts after a volume delete; they call back into it."""
    return any(_stat_ppid(pid) == glusterd and "/hooks/" in " ".join(_cmdline(pid)) for pid in _pids())


def _stat_ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def teardown(cluster: Cluster = Cluster(), log: Log = print) -> None:
    """Unmount every node, stop and delete the volume, end our glusterd by pid, remove bricks and mounts.

    Safe on a machine where nothing (or only part) was set up.
    """
    did = False
    ours = f"localhost:/{cluster.volume}"
    for point in sorted(p for p, source in _mounts().items() if source == ours and p.startswith(cluster.mount_dir + "/")):
        proc = subprocess.run(["umount", point], capture_output=True, text=True, timeout=CLI_TIMEOUT)
        if proc.returncode != 0:  # a node process still holds it: detach, the client exits when it lets go
            subprocess.run(["umount", "-l", point], check=True, timeout=CLI_TIMEOUT)
        log(f"unmounted {point}" + ("" if proc.returncode == 0 else " (lazily: it was busy)"))
        did = True
    glusterd_was_running = shutil.which("gluster") is not None and _any_glusterd() is not None
    volume_defined = os.path.isdir(f"/var/lib/glusterd/vols/{cluster.volume}")
    if volume_defined and not glusterd_was_running:
        start_glusterd(cluster, log)  # a volume left by a crashed run: glusterd must delete it
    if shutil.which("gluster") is not None and _any_glusterd() is not None and _volume_exists(cluster):
        if _volume_started(cluster):
            _gluster("volume", "stop", cluster.volume, "force")
            log(f"volume {cluster.volume}: stopped")
        _gluster("volume", "delete", cluster.volume)
        log(f"volume {cluster.volume}: deleted")
        did = True
    listed = _gluster("volume", "list", check=False).stdout.splitlines() if _any_glusterd() is not None else []
    others = [v.strip() for v in listed if v.strip() not in ("", cluster.volume, "No volumes present in cluster")]
    if (pid := _our_glusterd(cluster)) is not None and others:
        log(f"glusterd: left running (pid {pid}): it still serves {', '.join(others)}")
    elif pid is not None:
        _poll(lambda: not _hooks_running(pid), STOP_TIMEOUT, "glusterd's post-delete hook scripts")
        os.kill(pid, signal.SIGTERM)
        if not wait_gone(pid, STOP_TIMEOUT):
            os.kill(pid, signal.SIGKILL)
            wait_gone(pid, STOP_TIMEOUT)
        log(f"glusterd: stopped (pid {pid})")
        os.unlink(cluster.pidfile)
        did = True
    for pid in _volume_processes(cluster):
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid, STOP_TIMEOUT)
        log(f"killed leftover gluster process {pid} of volume {cluster.volume}")
        did = True
    for path in (cluster.brick_dir, cluster.mount_dir):
        if os.path.exists(path):
            if busy := [p for p in _all_mount_points() if p == path or p.startswith(path + "/")]:
                raise RuntimeError(f"not removing {path}: still mounted there: {', '.join(busy)}")
            shutil.rmtree(path)
            log(f"removed {path}")
            did = True
    if not did:
        log("nothing to tear down")


def status(cluster: Cluster = Cluster(), log: Log = print) -> bool:
    """Print what is up; True if the volume is started and every node is mounted."""
    if why := why_unusable():
        log(f"unusable: {why}")
        return False
    ours, anyone = _our_glusterd(cluster), _any_glusterd()
    state = f"pid {ours} (ours)" if ours else f"pid {anyone} (not ours)" if anyone else "not running"
    log(f"glusterd: {state}")
    up = anyone is not None and _volume_exists(cluster) and _volume_started(cluster)
    log(f"volume {cluster.volume}: {'started' if up else 'not started or missing'}")
    mounted = _mounts()
    for node in cluster.nodes:
        point = cluster.mount(node)
        log(f"node {node}: {'mounted at ' + point if point in mounted else 'not mounted'}")
        up = up and point in mounted
    return up


def node_argv(node: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run as ``node``: in a new UTS namespace whose hostname is the node's."""
    return ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', hostname(node), *argv]


def popen_as(node: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
    """Start ``argv`` as ``node``, in a session of its own so the whole node can be killed by its pgid."""
    return subprocess.Popen(node_argv(node, argv), start_new_session=True, **kwargs)


def python_as(node: str, script: str, *args: str, **kwargs) -> subprocess.Popen:
    """Run a Python script file (or, if ``script`` is not a file, a code snippet) as ``node``."""
    head = [script] if os.path.isfile(script) else ["-c", script]
    return popen_as(node, [sys.executable, *head, *args], **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volume", default=Cluster.volume)
    parser.add_argument("--nodes", default=",".join(Cluster.nodes), help="comma list of node names (default A,B,C)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("setup", help="start glusterd, create and start the volume, mount every node")
    up.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="gluster volume set KEY VALUE")
    up.add_argument("--replica", type=int, default=Cluster.replica, help="bricks holding each file (default 2)")
    sub.add_parser("teardown", help="unmount, stop and delete the volume, stop our glusterd, remove bricks")
    sub.add_parser("status", help="what is up; exit 1 unless everything is")
    run = sub.add_parser("run", help="run a command as a node: NODE -- CMD ...")
    run.add_argument("node")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    options = dict(o.split("=", 1) for o in getattr(args, "option", []))
    cluster = Cluster(volume=args.volume, nodes=tuple(args.nodes.split(",")), options=options, replica=getattr(args, "replica", 2))
    try:
        if args.command == "setup":
            started = time.monotonic()
            setup(cluster)
            print(f"setup: {time.monotonic() - started:.1f} s")
        elif args.command == "teardown":
            started = time.monotonic()
            teardown(cluster)
            print(f"teardown: {time.monotonic() - started:.1f} s")
        elif args.command == "status":
            return 0 if status(cluster) else 1
        else:
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not cmd:
                parser.error("run: give a command after the node name")
            return popen_as(args.node, cmd).wait()
    except (GlusterUnavailable, RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
