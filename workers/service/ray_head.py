"""The service's local Ray head: started when no cluster is given, adopted after a restart, stopped with
the service. It listens on loopback only and asks for a token on every dashboard call (docs/service.md)."""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx

log = logging.getLogger("sea_convert.ray_head")


def _free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports (all held open while picked, so none repeats)."""
    held = []
    try:
        for _ in range(n):
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def _auth_headers() -> dict:
    """Ray's token header when the cluster uses token authentication, as Ray's own job client sends it.
    Since Ray 2.5x a local head turns token mode on by itself once ~/.ray/auth_token exists (any
    ray.init() on the machine writes one); this process then follows the same rule, so its health
    checks and its JobSubmissionClient carry the token instead of getting 401s. (A head the service
    starts itself has a token of its own: `LocalRayHead.auth_headers`.)"""
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
        from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
    except ImportError:  # a Ray without token authentication
        return {}
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    return get_auth_headers_if_auth_enabled({})


def bearer(token_file: Path) -> dict:
    """The header Ray's dashboard (and its Jobs API) takes a token in, for the token kept in `token_file`."""
    return {"Authorization": f"Bearer {Path(token_file).read_text().strip()}"}


def _alive(dashboard: str, headers: dict | None = None) -> bool:
    """The dashboard answers, to `headers` (None: Ray's own token rules, `_auth_headers`)."""
    try:
        return httpx.get(f"{dashboard}/api/version", headers=_auth_headers() if headers is None else headers,
                         timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# Ray drains a node on SIGTERM for up to 30 s, for Serve replicas to move; a head of the service runs only its
# jobs and is stopped when none is active, so an idle head would wait out the 30 s for nothing
HEAD_ENV = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}

LOOPBACK = "127.0.0.1"
TOKEN_FILE = "ray-auth-token"
# Every listener of a local head, on a port of its own (each head its own set: no fixed port of Ray's, e.g. the
# agent's 52365 or the client server's 10001, is shared by two heads on one machine). The `ray start` flag of each,
# or the variable Ray reads it from (the two metrics servers have no flag).
PORT_FLAGS = {
    "gcs": "--port",
    "dashboard": "--dashboard-port",
    "node_manager": "--node-manager-port",  # raylet
    "object_manager": "--object-manager-port",  # raylet
    "dashboard_agent_http": "--dashboard-agent-listen-port",
    "dashboard_agent_grpc": "--dashboard-agent-grpc-port",
    "metrics_export": "--metrics-export-port",  # the dashboard agent's Prometheus exporter
    "runtime_env_agent": "--runtime-env-agent-port",
    "ray_client_server": "--ray-client-server-port",
    "dashboard_metrics": "DASHBOARD_METRIC_PORT",  # the dashboard's own Prometheus server
    "autoscaler_metrics": "AUTOSCALER_METRIC_PORT",  # the monitor's Prometheus server
}
REQUIRED_ROLES = ("gcs", "dashboard", "node_manager", "object_manager", "dashboard_agent_http",
                  "dashboard_agent_grpc", "runtime_env_agent")  # what the Jobs API needs; the others come after
WORKER_PORTS = (10002, 19999)  # Ray's default range (each worker's and driver's own gRPC server), stated explicitly


def _is_loopback(ip: str) -> bool:
    import ipaddress

    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # gRPC's sockets are IPv6 ones: ::ffff:127.0.0.1
    return (mapped or addr).is_loopback


def head_processes(pid: int) -> list:
    """The head's processes (psutil): its process group (`ray start --block` and the daemons it starts) and every
    descendant (worker processes, which Ray puts in process groups of their own, and the job drivers they start)."""
    import psutil

    procs = {}
    try:
        root = psutil.Process(pid)
        for p in (root, *root.children(recursive=True)):
            procs[p.pid] = p
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter():
        try:
            if p.pid not in procs and os.getpgid(p.pid) == pid:
                procs[p.pid] = p
        except OSError:
            pass
    return list(procs.values())


def listeners(pids) -> list[dict]:
    """Every TCP socket listening and every UDP socket bound in processes `pids` (ints or psutil processes):
    address (ip:port as bound), ip, port, protocol, pid and process name, as `ss -ltnup` lists them."""
    import psutil

    seen = []
    for p in pids:
        try:
            p = p if isinstance(p, psutil.Process) else psutil.Process(p)
            name, conns = p.name(), p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        for c in conns:
            tcp = c.type == socket.SOCK_STREAM
            if (tcp and c.status != psutil.CONN_LISTEN) or (not tcp and c.raddr):
                continue
            ip, port = c.laddr.ip, c.laddr.port
            seen.append({"address": f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}", "ip": ip, "port": port,
                         "proto": "tcp" if tcp else "udp", "pid": p.pid, "process": name})
    return sorted(seen, key=lambda s: (s["port"], s["pid"]))


def _forget_ray_address(gcs: str | None) -> None:
    """`ray start --head` leaves its address in Ray's temp folder (ray_current_cluster) for a later `ray.init()`;
    once the head is gone that pointer makes a user's `ray.init()` try to join a dead cluster. `ray stop` removes
    it; so does this, when it still names this head (another head may have written it since)."""
    from ray._common.utils import get_ray_address_file

    pointer = Path(get_ray_address_file(None))
    try:
        if gcs and pointer.read_text().strip() == gcs:
            pointer.unlink()
    except FileNotFoundError:
        pass


class LocalRayHead:
    """A Ray head on this machine, started by the service (`ray start --head --block` in its own
    session), recorded in `<state_dir>/ray-head.json` so a restarted service adopts it instead of
    starting a second one, and stopped with SIGTERM (Ray drains, then stops its processes).

    Only this machine reaches it, and only with its token:
    - node address 127.0.0.1. On Linux `ray start --node-ip-address=127.0.0.1` alone is rewritten to the
      machine's routable address (`services.resolve_ip_for_localhost`); RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
      (Ray's single-machine mode: no other node can join) keeps it. With a node address of 127.0.0.1 the GCS,
      the raylet, the workers' and drivers' gRPC servers, the dashboard agent, the runtime-env agent, the
      metrics servers and the client server all bind 127.0.0.1 (Ray binds loopback only when the node
      address is loopback; any other address means all interfaces);
    - RAY_AUTH_MODE=token with RAY_AUTH_TOKEN_PATH=<state_dir>/ray-auth-token: a token this service generates,
      in a file created 0600; every process of the head (job drivers included) inherits the two variables
      (the path, never the token); Ray's gRPC servers refuse a call without the token (Unauthenticated), its
      HTTP servers (dashboard, agents) a request (401; 403 for a wrong token);
    - the record lists the sockets its daemons listen on (read back from the process table; workers' own
      servers come and go in WORKER_PORTS, on 127.0.0.1 as well) and the token file's path (never the token).
    Not a TCP matter: Ray's Unix sockets and session files are under its temp folder (RAY_TMPDIR, /tmp/ray)."""

    def __init__(self, state_dir: Path, num_cpus: int | None = None, num_gpus: int | None = None,
                 resources: dict[str, float] | None = None):
        self.state_dir = Path(state_dir)
        self.record = self.state_dir / "ray-head.json"
        self.token_file = self.state_dir.absolute() / TOKEN_FILE  # absolute: job drivers run in other folders
        self.num_cpus, self.num_gpus, self.resources = num_cpus, num_gpus, resources or {}

    def _read(self) -> dict | None:
        try:
            return json.loads(self.record.read_text())
        except (OSError, ValueError):
            return None

    def env(self) -> dict[str, str]:
        """What the head runs with, and what a process that connects to it as a Ray client (`ray.init(address=
        <gcs>)`) needs: token mode with this head's token file, and loopback as its node address (else Ray
        rewrites the address 127.0.0.1 to the machine's routable one before it connects). Never the token."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file),
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

    def auth_headers(self) -> dict:
        """The dashboard's (and Jobs API's) header for this head's token."""
        return bearer(self.token_file)

    def recorded_token_file(self) -> Path | None:
        """The token file of the recorded head; None for a head recorded without one (before tokens)."""
        rec = self._read() or {}
        return Path(rec["token_file"]) if rec.get("token_file") else None

    def _headers_for(self, rec: dict) -> dict | None:
        if not rec.get("token_file"):
            return None  # recorded before the service gave its heads a token: Ray's own rules
        try:
            return bearer(Path(rec["token_file"]))
        except OSError:
            return {}  # its token is gone: it cannot be adopted

    def _ensure_token(self) -> None:
        """Keep the token file this service wrote (a regular file of this user, mode 0600), else write a new
        one: created with mode 0600 (O_EXCL under a temporary name, then renamed over), never chmod'ed."""
        try:
            st = os.lstat(self.token_file)
            if (stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o600
                    and st.st_size >= 32):
                return
        except FileNotFoundError:
            pass
        tmp = self.token_file.with_name(f".{TOKEN_FILE}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # 256 bits, Ray's own format (`ray get-auth-token --generate`)
        os.replace(tmp, self.token_file)

    def ensure(self, timeout: float = 120) -> tuple[str, bool]:
        """(dashboard address, adopted): an alive recorded head is adopted (with its token), else a new one starts."""
        rec = self._read()
        if rec and _alive(rec["dashboard"], self._headers_for(rec)):
            if not rec.get("token_file"):
                log.warning("adopting a local Ray head started without a token of the service's and not bound to "
                            "loopback only; the next head the service starts will be")
            log.info("adopting the local Ray head at %s (pid %s)", rec["dashboard"], rec["pid"])
            return rec["dashboard"], True
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._ensure_token()
        from ray._private.utils import get_ray_client_dependency_error

        roles = [r for r in PORT_FLAGS if r != "ray_client_server" or get_ray_client_dependency_error() is None]
        ports = dict(zip(roles, _free_ports(len(roles))))
        # `ray start` through the interpreter: a `pip install --target` (a GPU host's staging) puts no `ray` beside it
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               f"--node-ip-address={LOOPBACK}", f"--dashboard-host={LOOPBACK}", "--include-dashboard=true",
               f"--min-worker-port={WORKER_PORTS[0]}", f"--max-worker-port={WORKER_PORTS[1]}", "--disable-usage-stats"]
        cmd += [f"{PORT_FLAGS[r]}={p}" for r, p in ports.items() if PORT_FLAGS[r].startswith("--")]
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        if self.num_gpus is not None:
            cmd.append(f"--num-gpus={self.num_gpus}")
        if self.resources:
            cmd.append(f"--resources={json.dumps(self.resources)}")
        env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}  # it would win over the token file
        env.update(HEAD_ENV, **self.env(), **{PORT_FLAGS[r]: str(p) for r, p in ports.items()
                                             if not PORT_FLAGS[r].startswith("--")})
        logfile = open(self.state_dir / "ray-head.log", "ab")
        # its own session: a Ctrl-C meant for the service does not reach the head (jobs keep running)
        proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        dashboard, headers = f"http://{LOOPBACK}:{ports['dashboard']}", self.auth_headers()
        deadline = time.monotonic() + timeout

        def wait(what: str) -> None:
            if proc.poll() is not None:
                raise RuntimeError(f"the local Ray head exited ({proc.returncode}); see {self.state_dir / 'ray-head.log'}")
            if time.monotonic() > deadline:
                proc.terminate()
                raise RuntimeError(f"the local Ray head did not {what} within {timeout:.0f} s")
            time.sleep(0.5)

        while not _alive(dashboard, headers):
            wait("answer")
        optional_until = None
        while True:  # every listener up (the Jobs API needs the agents); the metrics and client servers a while more
            bound = listeners(head_processes(proc.pid))
            missing = set(ports) - {r for r, p in ports.items() if any(s["port"] == p for s in bound)}
            if not missing & set(REQUIRED_ROLES):
                optional_until = optional_until or time.monotonic() + 15
                if not missing or time.monotonic() > optional_until:
                    break
            wait(f"open {', '.join(sorted(missing))}")
        by_port = {p: r for r, p in ports.items()}
        listening = [{"role": by_port.get(s["port"], "other"),
                      **{k: s[k] for k in ("address", "proto", "process", "pid")}}
                     for s in bound if s["port"] in by_port or not s["process"].startswith("ray::")]  # not workers
        self.write_record(proc.pid, dashboard, f"{LOOPBACK}:{ports['gcs']}", node_ip=LOOPBACK,
                          token_file=str(self.token_file), listening=listening,
                          worker_ports=f"{WORKER_PORTS[0]}-{WORKER_PORTS[1]}")
        exposed = [s["address"] + f" ({s['process']})" for s in bound if not _is_loopback(s["ip"])]
        if exposed:
            self.stop()
            raise RuntimeError(f"the local Ray head listened beyond loopback ({', '.join(exposed)}): stopped it")
        log.info("started a local Ray head at %s (pid %d), loopback only, token in %s", dashboard, proc.pid,
                 self.token_file)
        return dashboard, False

    def write_record(self, pid: int, dashboard: str, gcs: str, **more) -> None:
        """Record a head (the leader of its own process group) for `ensure` to adopt and `stop` to end."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": pid, "dashboard": dashboard, "gcs": gcs, **more}, indent=1))
        os.replace(tmp, self.record)

    def stop(self, timeout: float = 60) -> bool:
        """SIGTERM the head and wait for its process group to end (SIGKILL after `timeout`); False when there was none."""
        rec = self._read()
        if rec is None:
            return False
        try:
            # SIGTERM to `ray start --block` alone: it drains the node through the GCS, then stops the group's
            # processes itself. Signalled too, the GCS would die first and the drain wait out its 30 s.
            os.kill(rec["pid"], signal.SIGTERM)
        except ProcessLookupError:
            self.record.unlink(missing_ok=True)
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.waitpid(rec["pid"], os.WNOHANG)  # reap it when this process started it (else a zombie lingers)
            except ChildProcessError:
                pass
            try:
                os.killpg(rec["pid"], 0)
            except ProcessLookupError:
                break
            time.sleep(0.3)
        else:
            os.killpg(rec["pid"], signal.SIGKILL)
        self.record.unlink(missing_ok=True)
        _forget_ray_address(rec.get("gcs"))
        log.info("stopped the local Ray head (pid %s)", rec["pid"])
        return True
