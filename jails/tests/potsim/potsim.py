#!/usr/bin/env python3
"""A simulator of FreeBSD's `pot`, `jexec` and `rctl`, for testing kiln's pot backend on Linux.

It keeps pot's layout and state rules over a plain directory tree (POT_FS_ROOT):

  <fs_root>/jails/NAME/m               the pot's root (a ZFS dataset on FreeBSD)
  <fs_root>/jails/NAME/conf/pot.conf   its configuration
  <fs_root>/.potsim/snap/NAME/TAG/     snapshots (ZFS snapshots `…/jails/NAME@TAG`), copies of m
  <fs_root>/.potsim/origin/NAME        BASE@TAG: the snapshot a clone was made from (ZFS origin)
  <fs_root>/.potsim/running/NAME       present while the pot's jail runs (`jls -j NAME`)
  <fs_root>/.potsim/rctl               rctl rules, one a line
  <fs_root>/.potsim/log                every command run, one a line (for tests)

Rules kept, with pot's own messages (pot prints its `###>` errors on stdout, ZFS on stderr):
- clone needs a snapshot of its base (or -F to take one); names are unique and have no '.';
- snapshot and revert are refused while the pot runs; snapshots are named by the epoch second,
  and a second snapshot within the same second fails in ZFS while pot still exits 0;
- revert goes back to the snapshot whose name sorts last;
- start and stop of a pot already in that state succeed; start sleeps like pot does;
- stop (and destroy -F) kill every process inside the jail (whose root is the pot's m);
- destroy refuses a pot whose snapshots are the origin of clones (ZFS "dependent clones"),
  and a running pot without -F;
- jexec refuses a pot that is not running, looks the user up in the jail's /etc/passwd, then
  chroots into m, drops to that user and execs the command, keeping its process id (like
  jail_attach + setusercontext + execvp).
pot is not safe to drive concurrently: a command that finds another command working on the
same pot fails loudly (exit 70) instead of racing, so tests catch a caller that does not
serialise its pot operations.

Not simulated: ZFS itself (snapshots are full copies), jail isolation beyond chroot (no
separate process, network or IPC namespace, no securelevel), devfs, networking, rctl
enforcement (rules are only recorded), pot's help texts.

Usage: potsim.py --fs-root DIR pot|jexec|rctl ARGS...
       potsim.py setup DIR --template NAME --user NAME --uid N [--copy PROGRAM...]
         makes DIR/bin/{pot,jexec,rctl} wrappers and DIR/fs (the fs root) with a template pot
         holding the programs given (with their shared libraries), /tmp, and the user.
"""

import errno
import fcntl
import getopt
import json
import os
import shutil
import signal
import subprocess
import sys
import time

ZFS_ROOT = "zroot/pot"


class Sim:
    def __init__(self, fs_root):
        self.fs = os.path.abspath(fs_root)
        self.state = os.path.join(self.fs, ".potsim")
        for sub in ("snap", "origin", "running", "lock"):
            os.makedirs(os.path.join(self.state, sub), exist_ok=True)
        self.held = []

    # -- layout ------------------------------------------------------------------------------
    def pdir(self, name):
        return os.path.join(self.fs, "jails", name)

    def root(self, name):
        return os.path.join(self.pdir(name), "m")

    def is_pot(self, name):
        return (
            bool(name)
            and "/" not in name
            and os.path.isdir(self.root(name))
            and os.path.isfile(os.path.join(self.pdir(name), "conf", "pot.conf"))
        )

    def running(self, name):
        return os.path.exists(os.path.join(self.state, "running", name))

    def snaps(self, name):
        d = os.path.join(self.state, "snap", name)
        if not os.path.isdir(d):
            return []
        # `zfs list -t snapshot | sort -r | head -n1`: the name that sorts last is "latest".
        return sorted(os.listdir(d))

    def origin_of(self, name):
        path = os.path.join(self.state, "origin", name)
        if os.path.exists(path):
            with open(path) as f:
                return f.read().strip()
        return None

    def pots(self):
        d = os.path.join(self.fs, "jails")
        if not os.path.isdir(d):
            return []
        return sorted(p for p in os.listdir(d) if os.path.isdir(os.path.join(d, p)))

    # -- concurrency -------------------------------------------------------------------------
    def hold(self, name):
        """Claims pot `name` for this command, or fails: pot is not safe to run concurrently."""
        fd = os.open(os.path.join(self.state, "lock", name), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                sys.stderr.write(
                    "potsim: another pot command is working on %s at the same time: pot is "
                    "not safe to drive concurrently (bsdpot/pot#202)\n" % name
                )
                self.log("CONCURRENT %s" % name)
                sys.exit(70)
            raise
        self.held.append(fd)

    def log(self, line):
        with open(os.path.join(self.state, "log"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(line + "\n")

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def error(msg):
        # pot's _error: `echo "###> " "$@"` on stdout.
        print("###>  " + msg, flush=True)

    @staticmethod
    def copy_tree(src, dst):
        """A faithful copy (owners, modes, links, hard links, times), as a ZFS clone would be."""
        os.makedirs(dst, exist_ok=True)
        subprocess.run(["cp", "-a", src + "/.", dst + "/"], check=True)

    @staticmethod
    def empty_dir(path):
        for entry in os.listdir(path):
            full = os.path.join(path, entry)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.unlink(full)

    def kill_jail_processes(self, name):
        """`jail -r`: every process whose root is the jail's root dies."""
        root = os.path.realpath(self.root(name))
        for _ in range(100):
            found = False
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or int(pid) == os.getpid():
                    continue
                try:
                    if os.readlink("/proc/%s/root" % pid) != root:
                        continue
                    os.kill(int(pid), signal.SIGKILL)
                    found = True
                except OSError:
                    continue
            if not found:
                return
            time.sleep(0.05)

    def take_snapshot(self, name):
        tag = str(int(time.time()))
        dest = os.path.join(self.state, "snap", name, tag)
        if os.path.exists(dest):
            # zfs refuses; pot's _pot_zfs_snap ignores the status and pot exits 0.
            sys.stderr.write(
                "cannot create snapshot '%s/jails/%s@%s': dataset already exists\n"
                % (ZFS_ROOT, name, tag)
            )
            self.log("SNAPSHOT-LOST %s@%s" % (name, tag))
            return tag
        tmp = dest + ".partial"
        self.copy_tree(self.root(name), tmp)
        os.rename(tmp, dest)
        return tag

    # -- pot commands ------------------------------------------------------------------------
    def pot(self, args):
        if not args:
            print("usage: pot command [options]")
            return 1
        cmd, rest = args[0], args[1:]
        handler = {
            "ls": self.ls,
            "list": self.ls,
            "clone": self.clone,
            "snapshot": self.snapshot,
            "snap": self.snapshot,
            "revert": self.revert,
            "start": self.start,
            "run": self.start,
            "stop": self.stop,
            "destroy": self.destroy,
        }.get(cmd)
        if handler is None:
            self.error("unknown command %s (potsim implements ls, clone, snapshot, revert, "
                       "start, stop, destroy)" % cmd)
            return 1
        try:
            return handler(rest)
        except getopt.GetoptError as e:
            self.error(str(e))
            return 1

    def ls(self, args):
        opts, _ = getopt.getopt(args, "hvbfFapqBo:")
        quiet = any(o == "-q" for o, _ in opts)
        pots = self.pots()
        if not pots:
            if not quiet:
                print("No pot created yet...")
            return 0
        for p in pots:
            if quiet:
                print(p)
            else:
                print("pot name : %s\n\tactive : %s\n" % (p, "true" if self.running(p) else "false"))
        return 0

    def clone(self, args):
        opts, _ = getopt.getopt(args, "hvp:i:P:FN:B:S:f:ks:d:")
        name = base = snap = None
        autosnap = False
        for o, v in opts:
            if o == "-p":
                if "." in v:
                    self.error("%s is not a valid name for a pot ('.' is the only character "
                               "not allowed)" % v)
                    return 1
                name = v
            elif o == "-P":
                base = v
            elif o == "-s":
                snap = v
            elif o == "-F":
                autosnap = True
        if not name:
            self.error("pot name is missing (option -p)")
            return 1
        if not base:
            self.error("reference pot name is missing (option -P)")
            return 1
        if not self.is_pot(base):
            self.error("reference pot %s not found" % base)
            return 1
        self.hold(base)
        if name != base:
            self.hold(name)
        if self.is_pot(name) or os.path.exists(self.pdir(name)):
            self.error("pot %s already exists" % name)
            return 1
        if snap is not None:
            if autosnap:
                self.error("-s and -F are incompatible - which snapshot should I use")
                return 1
            if snap not in self.snaps(base):
                self.error("snapshot %s not found" % snap)
                return 1
        else:
            snaps = self.snaps(base)
            if snaps:
                snap = snaps[-1]
            elif autosnap:
                snap = self.take_snapshot(base)
            else:
                self.error("%s/jails/%s/m has no snap - please take a snapshot of %s"
                           % (ZFS_ROOT, base, base))
                return 1
        self.copy_tree(os.path.join(self.state, "snap", base, snap), self.root(name))
        conf = os.path.join(self.pdir(name), "conf")
        os.makedirs(conf, exist_ok=True)
        with open(os.path.join(self.pdir(base), "conf", "pot.conf")) as f:
            lines = [l for l in f if not l.startswith("host.hostname=")]
        lines.append('host.hostname="%s"\n' % name)
        with open(os.path.join(conf, "pot.conf"), "w") as f:
            f.writelines(lines)
        with open(os.path.join(self.state, "origin", name), "w") as f:
            f.write("%s@%s\n" % (base, snap))
        return 0

    def stopped_pot(self, opts, action):
        """The `-p` pot of snapshot and revert, held; None (after pot's message) when it is
        missing, not a pot, or running."""
        name = next((v for o, v in opts if o == "-p"), None)
        if not name:
            self.error("one of -p|-f has to be used")
            return None
        if not self.is_pot(name):
            self.error("%s is not a pot!" % name)
            return None
        self.hold(name)
        if self.running(name):
            self.error("The pot %s is still running. %s is possible only for stopped pots"
                       % (name, action))
            return None
        return name

    def snapshot(self, args):
        opts, _ = getopt.getopt(args, "hvp:f:r")
        name = self.stopped_pot(opts, "Snapshot")
        if name is None:
            return 1
        self.take_snapshot(name)
        return 0

    def revert(self, args):
        opts, _ = getopt.getopt(args, "hvap:f:")
        name = self.stopped_pot(opts, "Revert")
        if name is None:
            return 1
        snaps = self.snaps(name)
        if not snaps:
            return 0  # "has not snapshot - no possible rollback", an info message only
        root = self.root(name)
        self.empty_dir(root)
        self.copy_tree(os.path.join(self.state, "snap", name, snaps[-1]), root)
        return 0

    @staticmethod
    def name_arg(args, flags):
        """`-p NAME` or a bare NAME, as pot's start and stop accept."""
        opts, rest = getopt.getopt(args, flags)
        name = next((v for o, v in opts if o == "-p"), None)
        return name or (rest[0] if rest else None)

    def start(self, args):
        name = self.name_arg(args, "hvsSp:")
        if not name:
            self.error("A pot name is mandatory")
            return 1
        if not self.is_pot(name):
            self.error("Pot %s not found" % name)
            return 1
        self.hold(name)
        if self.running(name):
            return 0  # "pot NAME is already running", a debug message only
        tmp = os.path.join(self.root(name), "tmp")
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            # pot writes its start script into the jail; the next revert erases it.
            with open(os.path.join(tmp, "tinirc"), "w") as f:
                f.write("#!/bin/sh\nexec sleep 1234\n")
        open(os.path.join(self.state, "running", name), "w").close()
        time.sleep(float(os.environ.get("POTSIM_START_DELAY", "0.5")))
        return 0

    def stop(self, args):
        name = self.name_arg(args, "hvp:")
        if not name:
            self.error("A pot name is mandatory")
            return 1
        if not self.is_pot(name):
            self.error("The pot %s is not a valid pot" % name)
            return 1
        self.hold(name)
        self.stop_jail(name)
        return 0

    def stop_jail(self, name):
        self.kill_jail_processes(name)
        try:
            os.unlink(os.path.join(self.state, "running", name))
        except FileNotFoundError:
            pass

    def destroy(self, args):
        opts, _ = getopt.getopt(args, "hvrf:p:b:FB:q")
        name = next((v for o, v in opts if o == "-p"), None)
        force = any(o == "-F" for o, _ in opts)
        if not name:
            self.error("-b or -p or -f or -B are missing")
            return 1
        if not self.is_pot(name):
            self.error("pot %s not found or corrupted. Try to use the -F flag" % name)
            return 1
        self.hold(name)
        if self.running(name):
            if not force:
                self.error("pot %s is running" % name)
                return 1
            self.stop_jail(name)
        dependents = [
            p for p in self.pots()
            if p != name and (self.origin_of(p) or "").split("@")[0] == name
        ]
        if dependents:
            snap = self.origin_of(dependents[0]).split("@")[1]
            sys.stderr.write(
                "cannot destroy '%s/jails/%s/m@%s': snapshot has dependent clones\n"
                "use '-R' to destroy the following datasets:\n%s\n"
                % (ZFS_ROOT, name, snap,
                   "\n".join("%s/jails/%s/m" % (ZFS_ROOT, d) for d in dependents))
            )
            self.error("zfs failed to destroy the dataset %s/jails/%s" % (ZFS_ROOT, name))
            self.error("%s destruction failed" % name)
            return 1
        shutil.rmtree(self.pdir(name))
        shutil.rmtree(os.path.join(self.state, "snap", name), ignore_errors=True)
        for sub in ("origin", "running"):
            try:
                os.unlink(os.path.join(self.state, sub, name))
            except FileNotFoundError:
                pass
        return 0

    # -- jexec -------------------------------------------------------------------------------
    def jexec(self, args):
        try:
            opts, rest = getopt.getopt(args, "lnu:U:d:")
        except getopt.GetoptError:
            sys.stderr.write("usage: jexec [-l] [-d working-directory] [-u username | "
                             "-U username] jail [command ...]\n")
            return 1
        user = None
        for o, v in opts:
            if o in ("-u", "-U"):
                user = v
        if not rest:
            sys.stderr.write("usage: jexec [-l] [-d working-directory] [-u username | "
                             "-U username] jail [command ...]\n")
            return 1
        name, command = rest[0], rest[1:]
        if not self.is_pot(name) or not self.running(name):
            sys.stderr.write('jexec: jail "%s" not found\n' % name)
            return 1
        root = self.root(name)
        uid = gid = 0
        if user is not None:
            entry = None
            try:
                with open(os.path.join(root, "etc", "passwd")) as f:
                    for line in f:
                        fields = line.rstrip("\n").split(":")
                        if len(fields) >= 4 and fields[0] == user:
                            entry = fields
                            break
            except OSError:
                pass
            if entry is None:
                sys.stderr.write("jexec: %s: no such user\n" % user)
                return 1
            uid, gid = int(entry[2]), int(entry[3])
        if not command:
            command = ["/bin/sh"]
        self.log("jexec %s %s" % (name, json.dumps(command)))
        # jail_attach: into the jail's root; then the user's credentials; then execvp.
        os.chroot(root)
        os.chdir("/")
        os.setgroups([gid])
        os.setgid(gid)
        os.setuid(uid)
        try:
            os.execvp(command[0], command)
        except OSError as e:
            sys.stderr.write("jexec: execvp: %s: %s\n" % (command[0], e.strerror))
            return 1

    # -- rctl --------------------------------------------------------------------------------
    def rctl(self, args):
        # rctl(8) is one system call on FreeBSD: atomic. The rules file is updated under a lock.
        with open(os.path.join(self.state, "rctl.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self.rctl_locked(args)

    def rctl_locked(self, args):
        path = os.path.join(self.state, "rctl")
        rules = []
        if os.path.exists(path):
            with open(path) as f:
                rules = [l.strip() for l in f if l.strip()]
        if not args:
            for r in rules:
                print(r)
            return 0
        if len(args) == 2 and args[0] == "-a":
            rule = args[1]
            parts = rule.split(":")
            ok = (
                len(parts) == 4
                and parts[0] in ("jail", "user", "loginclass", "process")
                and parts[1]
                and parts[2] in ("memoryuse", "maxproc", "openfiles", "vmemoryuse",
                                 "cputime", "wallclock", "pcpu", "datasize", "stacksize")
                and "=" in parts[3]
                and parts[3].split("=")[0] in ("deny", "log", "devctl", "sigkill", "throttle")
                and parts[3].split("=")[1].rstrip("kmgtKMGT").isdigit()
            )
            if not ok:
                sys.stderr.write("rctl: failed to add rule '%s': Invalid argument\n" % rule)
                return 1
            rules.append(rule)
        elif len(args) == 2 and args[0] == "-r":
            subject = args[1].rstrip(":")
            rules = [r for r in rules if r != subject and not r.startswith(subject + ":")]
        else:
            sys.stderr.write("usage: rctl [-h] [-n] [filter]\n"
                             "       rctl -a rule\n"
                             "       rctl -r filter\n")
            return 1
        with open(path + ".tmp", "w") as f:
            f.write("".join(r + "\n" for r in rules))
        os.rename(path + ".tmp", path)
        return 0


def libraries(program):
    """The shared libraries `program` loads, as ldd names them."""
    out = subprocess.run(["ldd", program], capture_output=True, text=True)
    found = []
    for line in out.stdout.splitlines():
        line = line.strip()
        if "=>" in line:
            target = line.split("=>")[1].split("(")[0].strip()
            if target.startswith("/"):
                found.append(target)
        elif line.startswith("/"):
            found.append(line.split()[0])
    return found


def setup(argv):
    """The operator's part, done once: a template pot, snapshotted, and the command wrappers."""
    opts, rest = getopt.gnu_getopt(argv, "", ["template=", "user=", "uid=", "copy="])
    if len(rest) != 1:
        sys.exit("usage: potsim.py setup DIR --template NAME --user NAME --uid N [--copy P]...")
    top = os.path.abspath(rest[0])
    template = next(v for o, v in opts if o == "--template")
    user = next(v for o, v in opts if o == "--user")
    uid = int(next(v for o, v in opts if o == "--uid"))
    programs = [v for o, v in opts if o == "--copy"]
    fs = os.path.join(top, "fs")
    bindir = os.path.join(top, "bin")
    os.makedirs(bindir, exist_ok=True)
    me = os.path.abspath(__file__)
    for tool in ("pot", "jexec", "rctl"):
        path = os.path.join(bindir, tool)
        with open(path, "w") as f:
            f.write("#!/bin/sh\nexec '%s' '%s' --fs-root '%s' %s \"$@\"\n"
                    % (sys.executable, me, fs, tool))
        os.chmod(path, 0o755)
    root = os.path.join(fs, "jails", template, "m")
    for d in ("etc", "tmp", "dev", "usr/bin"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    # The template's layout is its host's, as a real template's is its clients' FreeBSD: on a
    # merged-/usr host /bin, /lib… are relative links into /usr, and toolchains packaged there
    # carry the same links.
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = "/" + top
        if os.path.islink(host) and not os.readlink(host).startswith("/"):
            os.makedirs(os.path.join(root, os.readlink(host)), exist_ok=True)
            os.symlink(os.readlink(host), os.path.join(root, top))
        elif os.path.isdir(host) and top in ("bin", "sbin"):
            os.makedirs(os.path.join(root, top), exist_ok=True)
    for program in programs:
        for path in [program] + libraries(program):
            # The file itself (not a link) at the path the program is known by.
            dest = os.path.join(root, path.lstrip("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copy2(os.path.realpath(path), dest)
    with open(os.path.join(root, "etc", "passwd"), "w") as f:
        f.write("root:*:0:0:Charlie &:/root:/bin/sh\n")
        f.write("%s:*:%d:%d:kiln jobs:/nonexistent:/usr/sbin/nologin\n" % (user, uid, uid))
    with open(os.path.join(root, "etc", "group"), "w") as f:
        f.write("wheel:*:0:root\n%s:*:%d:\n" % (user, uid))
    conf = os.path.join(fs, "jails", template, "conf")
    os.makedirs(conf, exist_ok=True)
    with open(os.path.join(conf, "pot.conf"), "w") as f:
        f.write('host.hostname="%s"\npot.level=0\npot.type=single\nnetwork_type=alias\n'
                'ip=lo0|127.0.0.2\npot.cmd=/usr/bin/true\npot.attr.no-rc-script=YES\n'
                % template)
    sim = Sim(fs)
    sim.take_snapshot(template)
    return 0


def main(argv):
    if argv and argv[0] == "setup":
        return setup(argv[1:])
    if len(argv) < 3 or argv[0] != "--fs-root":
        sys.stderr.write(__doc__)
        return 2
    sim = Sim(argv[1])
    tool, args = argv[2], argv[3:]
    if tool != "jexec":
        sim.log("%s %s" % (tool, " ".join(args)))
    if tool == "pot":
        return sim.pot(args)
    if tool == "jexec":
        return sim.jexec(args)
    if tool == "rctl":
        return sim.rctl(args)
    sys.stderr.write("potsim: unknown tool %s\n" % tool)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
