"""EC2 Instance Connect Endpoint (EICE) where moto has none (a gap fix of section 6 of localcloud.py).

moto knows nothing of EICE. Here:

* the EC2 API: ``CreateInstanceConnectEndpoint`` (SubnetId, SecurityGroupId.N, PreserveClientIp,
  ClientToken, TagSpecification.N of type ``instance-connect-endpoint``),
  ``DescribeInstanceConnectEndpoints`` (InstanceConnectEndpointId.N, Filter.N on state, vpc-id,
  subnet-id, instance-connect-endpoint-id, tag:K, tag-key; MaxResults/NextToken) and
  ``DeleteInstanceConnectEndpoint``, answered in the EC2 query protocol's XML as AWS's API
  reference shapes it (the Rust SDK's deserializer reads these element names). States follow
  the clock: ``create-in-progress`` for ``create_seconds`` (AWS takes minutes), then
  ``create-complete``; a delete goes ``delete-in-progress`` for ``create_seconds`` then
  ``delete-complete`` (kept in Describe, as AWS keeps deleted endpoints listed for a while).
  One endpoint per VPC (AWS's default quota): a second create in the same VPC fails with
  ``ResourceLimitExceeded``. The endpoint gets a network interface in its subnet (a real moto
  ENI, deleted with the endpoint) and the VPC's default group when no group is given.
* the tunnel: AWS serves ``wss://<DnsName>/openTunnel?...`` presigned with SigV4 in the query
  string (service ``ec2-instance-connect``). Loopback cannot be TLS under AWS's names, so a
  plain ``ws://127.0.0.1:<port>`` listener (``eice_ws=`` in the READY line) stands in; the client
  still sends ``Host: <DnsName>`` and signs that host. Before the upgrade the server checks, as
  AWS does, and refuses with an HTTP status and a one-line body: the signature (recomputed with
  the key's secret: ``testing`` for the static test key, moto's IAM/STS keys looked up in moto;
  an unknown key, a wrong signature, a date beyond ``X-Amz-Expires`` (at most 3600) -> 403),
  the scope (service ``ec2-instance-connect``, the endpoint's region), the endpoint (unknown ->
  404, not ``create-complete`` -> 404), the Host header (must be its DnsName -> 403), the
  parameters (400; remotePort other than 22 or 3389 too: AWS's endpoint tunnels to SSH and RDP
  only), and with a policy loaded ``ec2-instance-connect:OpenTunnel`` on the
  endpoint's ARN with the keys ``ec2-instance-connect:remotePort``, ``:privateIpAddress``,
  ``:maxTunnelDuration`` and the endpoint's tags (403, recorded in the policy's denials).
  Whether the target can be reached is a network matter on AWS: the upgrade succeeds and the
  endpoint then closes the WebSocket with 1011 "Unable to connect to target" when no running
  instance of the endpoint's VPC has that private IP, when none of its groups admits TCP
  remotePort from one of the endpoint's groups, or when nothing listens at remotePort (no
  simulated box; boxsim's box listens at 22, its sshd).
  Otherwise the bytes of what listens there (``boxsim.port_target(instance id, remotePort)``)
  travel as binary frames both ways; the endpoint closes with 1000 after min(maxTunnelDuration,
  ``tunnel_limit_seconds``) seconds, or when the box closes the TCP connection.
* control: ``GET /_localcloud/eice`` -> ``{"ws_url", "create_seconds", "tunnel_limit_seconds",
  "tunnels": [...]}``; ``PUT /_localcloud/eice {"create_seconds": 2, "tunnel_limit_seconds": 5}``
  merges and answers the same. Reset forgets endpoints and tunnels (open tunnels are closed) and
  restores the defaults.

The WebSocket side is a small RFC 6455 server on the standard library: handshake, masked
client frames, fragmentation, ping/pong, close codes.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
import socketserver
import struct
import threading
import time
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

import iampolicy

SERVICE = "ec2-instance-connect"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
DEFAULT_CREATE_SECONDS = 2.0
DEFAULT_TUNNEL_LIMIT = 3600.0
MAX_EXPIRES = 3600
MAX_FRAME = 1 << 20  # a client frame beyond this is refused (1009); the CLI sends <= 65000 bytes
OUT_CHUNK = 65000
STATIC_KEYS = {"testing": "testing"}  # the tests' static credentials (any session token)
OPCODES = {0: "cont", 1: "text", 2: "binary", 8: "close", 9: "ping", 10: "pong"}


class EiceError(Exception):
    """An EC2 API error: code, message, HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


class Refused(Exception):
    """A refused handshake: HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


# ---------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------
def _iso_ms(epoch: float) -> str:
    t = dt.datetime.fromtimestamp(epoch, dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _x(value: Any) -> str:
    s = str(value)
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


class Endpoint:
    def __init__(self, account: str, region: str, vpc_id: str, subnet_id: str, az: str,
                 group_ids: list[str], preserve_client_ip: bool, tags: dict[str, str],
                 client_token: str | None, create_seconds: float, eni_id: str | None):
        self.id = "eice-" + secrets.token_hex(9)[:17]
        self.account, self.region = account, region
        self.vpc_id, self.subnet_id, self.az = vpc_id, subnet_id, az
        self.group_ids, self.preserve_client_ip = group_ids, preserve_client_ip
        self.tags, self.client_token = dict(tags), client_token
        self.dns = (f"{self.id}.{secrets.token_hex(4)}.ec2-instance-connect-endpoint."
                    f"{region}.amazonaws.com")
        self.fips_dns = self.dns.replace(".ec2-instance-connect-endpoint.",
                                         ".fips.ec2-instance-connect-endpoint.")
        self.created_at = time.time()
        self.create_seconds = create_seconds
        self.deleted_at: float | None = None
        self.delete_seconds = create_seconds
        self.eni_id = eni_id
        self.params: dict[str, str] = {}

    @property
    def arn(self) -> str:
        return f"arn:aws:ec2:{self.region}:{self.account}:instance-connect-endpoint/{self.id}"

    def state(self, now: float | None = None) -> tuple[str, str]:
        now = time.time() if now is None else now
        if self.deleted_at is not None:
            if now < self.deleted_at + self.delete_seconds:
                return "delete-in-progress", ""
            return "delete-complete", ""
        if now < self.created_at + self.create_seconds:
            return "create-in-progress", ""
        return "create-complete", ""

    def xml(self, tag: str = "item") -> str:
        state, message = self.state()
        groups = "".join(f"<item>{_x(g)}</item>" for g in self.group_ids)
        enis = f"<item>{_x(self.eni_id)}</item>" if self.eni_id and state != "delete-complete" else ""
        tags = "".join(f"<item><key>{_x(k)}</key><value>{_x(v)}</value></item>"
                       for k, v in self.tags.items())
        return (f"<{tag}><ownerId>{self.account}</ownerId>"
                f"<instanceConnectEndpointId>{self.id}</instanceConnectEndpointId>"
                f"<instanceConnectEndpointArn>{_x(self.arn)}</instanceConnectEndpointArn>"
                f"<state>{state}</state><stateMessage>{_x(message)}</stateMessage>"
                f"<dnsName>{_x(self.dns)}</dnsName><fipsDnsName>{_x(self.fips_dns)}</fipsDnsName>"
                f"<networkInterfaceIdSet>{enis}</networkInterfaceIdSet>"
                f"<vpcId>{_x(self.vpc_id)}</vpcId><availabilityZone>{_x(self.az)}</availabilityZone>"
                f"<createdAt>{_iso_ms(self.created_at)}</createdAt>"
                f"<subnetId>{_x(self.subnet_id)}</subnetId>"
                f"<preserveClientIp>{'true' if self.preserve_client_ip else 'false'}</preserveClientIp>"
                f"<securityGroupIdSet>{groups}</securityGroupIdSet>"
                f"<ipAddressType>ipv4</ipAddressType>"
                f"<tagSet>{tags}</tagSet></{tag}>")

    def to_json(self) -> dict[str, Any]:
        state, message = self.state()
        return {"id": self.id, "arn": self.arn, "state": state, "state_message": message,
                "dns_name": self.dns, "fips_dns_name": self.fips_dns, "vpc_id": self.vpc_id,
                "subnet_id": self.subnet_id, "availability_zone": self.az,
                "security_group_ids": list(self.group_ids),
                "preserve_client_ip": self.preserve_client_ip, "tags": dict(self.tags),
                "network_interface_id": self.eni_id, "client_token": self.client_token,
                "created_at": self.created_at, "deleted_at": self.deleted_at,
                "owner_id": self.account, "region": self.region}


def _members(params: dict[str, str], prefix: str) -> list[str]:
    out = []
    for key, value in params.items():
        head, _, index = key.rpartition(".")
        if head == prefix and index.isdigit():
            out.append((int(index), value))
    return [v for _, v in sorted(out)]


def _filters(params: dict[str, str]) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for key, name in params.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "Filter" and parts[2] == "Name":
            result[name] = _members(params, f"Filter.{parts[1]}.Value")
    return result


def _tag_spec(params: dict[str, str], rtype: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for key, value in params.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "TagSpecification" and parts[2] == "ResourceType" \
                and value == rtype:
            n = parts[1]
            for tkey, tval in params.items():
                tp = tkey.split(".")
                if len(tp) == 5 and tp[:3] == ["TagSpecification", n, "Tag"] and tp[4] == "Key":
                    tags[tval] = params.get(f"TagSpecification.{n}.Tag.{tp[3]}.Value", "")
    return tags


def _glob_match(pattern: str, value: str) -> bool:
    import fnmatch
    return fnmatch.fnmatchcase(value, pattern)


# ---------------------------------------------------------------------------
# SigV4 query-string verification
# ---------------------------------------------------------------------------
def _uri_encode(s: str) -> str:
    return quote(s, safe="-_.~")


def canonical_query(raw_query: str) -> str:
    """SigV4's canonical query string of a raw query (X-Amz-Signature excluded): each name and
    value decoded, then encoded the SigV4 way, sorted by name then value."""
    pairs = []
    for part in raw_query.split("&"):
        if not part:
            continue
        k, _, v = part.partition("=")
        k, v = unquote(k.replace("+", "%20")), unquote(v.replace("+", "%20"))
        if k == "X-Amz-Signature":
            continue
        pairs.append((_uri_encode(k), _uri_encode(v)))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signature(secret: str, amz_date: str, region: str, service: str, string_to_sign: str) -> str:
    k = _hmac(("AWS4" + secret).encode(), amz_date[:8])
    k = _hmac(k, region)
    k = _hmac(k, service)
    k = _hmac(k, "aws4_request")
    return hmac.new(k, string_to_sign.encode(), hashlib.sha256).hexdigest()


def expected_signatures(secret: str, method: str, path: str, raw_query: str,
                        headers: dict[str, str], q: dict[str, str]) -> list[str]:
    """The signatures a correct signer can have produced. The payload hash of a presigned
    GET is the empty body's SHA-256 (botocore over a non-https URL, as the AWS CLI signs) or
    UNSIGNED-PAYLOAD (other SDKs' presigners); both are accepted."""
    signed = q.get("X-Amz-SignedHeaders", "")
    names = [h for h in signed.split(";") if h]
    canon_headers = "".join(f"{h}:{' '.join(headers.get(h, '').strip().split())}\n" for h in names)
    scope = q.get("X-Amz-Credential", "").split("/", 1)[-1]
    amz_date = q.get("X-Amz-Date", "")
    _, region, service, _ = (scope.split("/") + ["", "", "", ""])[:4]
    out = []
    for payload in (q.get("X-Amz-Content-Sha256") or EMPTY_SHA256, "UNSIGNED-PAYLOAD"):
        creq = "\n".join([method, quote(path, safe="/-_.~"), canonical_query(raw_query),
                          canon_headers, signed, payload])
        sts = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256(creq.encode()).hexdigest()])
        out.append(signature(secret, amz_date, region, service, sts))
    return out


# ---------------------------------------------------------------------------
# WebSocket framing (RFC 6455, server side)
# ---------------------------------------------------------------------------
class WsClosed(Exception):
    pass


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise WsClosed("peer closed the connection")
        buf += chunk
    return bytes(buf)


def read_frame(sock: socket.socket) -> tuple[bool, int, bytes]:
    """(fin, opcode, payload) of one frame from the client (masked, as RFC 6455 requires)."""
    b1, b2 = _recv_exact(sock, 2)
    fin, opcode = bool(b1 & 0x80), b1 & 0x0F
    masked, length = bool(b2 & 0x80), b2 & 0x7F
    if length == 126:
        length = struct.unpack("!H", _recv_exact(sock, 2))[0]
    elif length == 127:
        length = struct.unpack("!Q", _recv_exact(sock, 8))[0]
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes is too big")
    if not masked:
        raise ValueError("client frames must be masked")
    mask = _recv_exact(sock, 4)
    data = bytearray(_recv_exact(sock, length))
    for i in range(length):
        data[i] ^= mask[i & 3]
    return fin, opcode, bytes(data)


def frame(opcode: int, payload: bytes = b"") -> bytes:
    """One unmasked (server) frame."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack("!H", n)
    else:
        head += bytes([127]) + struct.pack("!Q", n)
    return head + payload


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()[:120]


# ---------------------------------------------------------------------------
# The gap fix
# ---------------------------------------------------------------------------
class Eice:
    """Endpoints, the tunnel listener and its log (attached to LocalCloud as cloud.eice)."""

    def __init__(self, cloud: Any, account: str):
        self.cloud = cloud
        self.account = account
        self.lock = threading.RLock()
        self.endpoints: dict[str, dict[str, Endpoint]] = {}  # region -> id -> endpoint
        self.tunnels: list[dict[str, Any]] = []
        self.live: set[socket.socket] = set()
        self.create_seconds = DEFAULT_CREATE_SECONDS
        self.tunnel_limit = DEFAULT_TUNNEL_LIMIT
        self.server: socketserver.ThreadingTCPServer | None = None
        self.ws_url = ""

    # -- wiring --------------------------------------------------------------
    def attach(self) -> "Eice":
        eice = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                eice.serve(self.request, self.client_address)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self.server = server
        self.ws_url = f"ws://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                         name="eice-ws", daemon=True).start()
        self.cloud.ready_extras["eice_ws"] = self.ws_url
        self.cloud.add_route("GET", "/_localcloud/eice", self._control)
        self.cloud.add_route("PUT", "/_localcloud/eice", self._control)
        self.cloud.on_reset(self.reset)
        self.cloud.on_shutdown(self.stop)
        self.cloud.eice = self
        return self

    def reset(self) -> None:
        with self.lock:
            self.endpoints.clear()
            self.tunnels = []
            self.create_seconds = DEFAULT_CREATE_SECONDS
            self.tunnel_limit = DEFAULT_TUNNEL_LIMIT
            live = list(self.live)
        for sock in live:
            _shut(sock)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        self.reset()

    def _control(self, environ: dict[str, Any], body: bytes) -> tuple[int, Any]:
        if environ.get("REQUEST_METHOD") == "PUT":
            try:
                doc = json.loads(body or b"{}")
            except ValueError:
                return 400, {"error": "body is not JSON"}
            if not isinstance(doc, dict):
                return 400, {"error": "body must be a JSON object"}
            unknown = set(doc) - {"create_seconds", "tunnel_limit_seconds"}
            if unknown:
                return 400, {"error": f"unknown eice config keys: {sorted(unknown)}"}
            try:
                with self.lock:
                    if "create_seconds" in doc:
                        self.create_seconds = max(0.0, float(doc["create_seconds"]))
                    if "tunnel_limit_seconds" in doc:
                        self.tunnel_limit = max(0.1, float(doc["tunnel_limit_seconds"]))
            except (TypeError, ValueError):
                return 400, {"error": "create_seconds and tunnel_limit_seconds are numbers"}
        with self.lock:
            return 200, {"ws_url": self.ws_url, "create_seconds": self.create_seconds,
                         "tunnel_limit_seconds": self.tunnel_limit,
                         "tunnels": [dict(t) for t in self.tunnels]}

    def dump(self, region: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e.to_json() for e in self.endpoints.get(region, {}).values()]

    def tags_of(self, region: str, endpoint_id: str) -> dict[str, str] | None:
        with self.lock:
            e = self.endpoints.get(region, {}).get(endpoint_id)
            return dict(e.tags) if e else None

    def uses_group(self, region: str, group_id: str) -> bool:
        """Whether an endpoint not yet delete-complete (its network interface) uses the group."""
        with self.lock:
            return any(group_id in e.group_ids and e.state()[0] != "delete-complete"
                       for e in self.endpoints.get(region, {}).values())

    # -- EC2 API (called with moto_lock held) --------------------------------
    def api(self, action: str, region: str, params: dict[str, str]) -> str:
        """The inner XML of the answer; raises EiceError."""
        backend = self.cloud.ec2_backend(region)
        with self.lock:
            self._reap(backend, region)
            if action == "CreateInstanceConnectEndpoint":
                return self._create(backend, region, params)
            if action == "DescribeInstanceConnectEndpoints":
                return self._describe(region, params)
            if action == "DeleteInstanceConnectEndpoint":
                return self._delete(region, params)
        raise EiceError("InvalidAction", f"{action} is not served here")

    def _create(self, backend: Any, region: str, p: dict[str, str]) -> str:
        token = p.get("ClientToken")
        tags = _tag_spec(p, "instance-connect-endpoint")
        ours = {k: v for k, v in p.items() if k not in ("Action", "Version")}
        if token:
            for e in self.endpoints.get(region, {}).values():
                if e.client_token == token:
                    if e.params != ours:
                        raise EiceError("IdempotentParameterMismatch",
                                        f"Client token {token} was used with other parameters.")
                    return e.xml("instanceConnectEndpoint") + f"<clientToken>{_x(token)}</clientToken>"
        subnet_id = p.get("SubnetId")
        if not subnet_id:
            raise EiceError("MissingParameter", "The request must contain the parameter SubnetId")
        try:
            subnet = backend.get_subnet(subnet_id)
        except Exception:
            raise EiceError("InvalidSubnetID.NotFound", f"The subnet ID '{subnet_id}' does not exist")
        vpc_id = subnet.vpc_id
        for other in self.endpoints.get(region, {}).values():
            if other.vpc_id == vpc_id and other.state()[0] != "delete-complete":
                raise EiceError("ResourceLimitExceeded",
                                f"You have reached the maximum number of EC2 Instance Connect "
                                f"Endpoints in {vpc_id} (1): {other.id} exists.")
        group_ids = _members(p, "SecurityGroupId")
        for gid in group_ids:
            group = backend.get_security_group_from_id(gid)
            if group is None:
                raise EiceError("InvalidGroup.NotFound", f"The security group '{gid}' does not exist")
            if group.vpc_id != vpc_id:
                raise EiceError("InvalidParameter",
                                f"Security group {gid} does not belong to VPC {vpc_id}")
        if not group_ids:
            default = backend.get_default_security_group(vpc_id)
            group_ids = [default.id] if default else []
        preserve = p.get("PreserveClientIp", "false").lower() == "true"
        eni_id = None
        try:
            eni = backend.create_network_interface(
                subnet, None, group_ids=group_ids,
                description="EC2 Instance Connect Endpoint network interface")
            eni_id = eni.id
        except Exception:
            eni = None
        e = Endpoint(self.account, region, vpc_id, subnet_id, subnet.availability_zone, group_ids,
                     preserve, tags, token, self.create_seconds, eni_id)
        e.params = ours
        if eni is not None:
            try:
                backend.create_tags([eni.id], {"InstanceConnectEndpointId": e.id})
            except Exception:
                pass
        self.endpoints.setdefault(region, {})[e.id] = e
        out = e.xml("instanceConnectEndpoint")
        if token:
            out += f"<clientToken>{_x(token)}</clientToken>"
        return out

    def _describe(self, region: str, p: dict[str, str]) -> str:
        ids = _members(p, "InstanceConnectEndpointId")
        known = self.endpoints.get(region, {})
        for i in ids:
            if i not in known:
                raise EiceError("InvalidInstanceConnectEndpointId.NotFound",
                                f"The instanceConnectEndpoint ID '{i}' does not exist")
        found = [known[i] for i in ids] if ids else sorted(known.values(), key=lambda e: e.created_at)
        for name, values in _filters(p).items():
            found = [e for e in found if self._filter_hit(e, name, values)]
        start = int(p.get("NextToken") or 0)
        size = int(p.get("MaxResults") or 1000)
        page = found[start:start + size]
        items = "".join(e.xml() for e in page)
        out = f"<instanceConnectEndpointSet>{items}</instanceConnectEndpointSet>"
        if start + size < len(found):
            out += f"<nextToken>{start + size}</nextToken>"
        return out

    @staticmethod
    def _filter_hit(e: Endpoint, name: str, values: list[str]) -> bool:
        fields = {"state": e.state()[0], "vpc-id": e.vpc_id, "subnet-id": e.subnet_id,
                  "instance-connect-endpoint-id": e.id, "availability-zone": e.az}
        if name in fields:
            return any(_glob_match(v, fields[name]) for v in values)
        if name == "tag-key":
            return any(_glob_match(v, k) for v in values for k in e.tags)
        if name.startswith("tag:"):
            value = e.tags.get(name[4:])
            return value is not None and any(_glob_match(v, value) for v in values)
        raise EiceError("InvalidParameterValue", f"The filter '{name}' is invalid")

    def _delete(self, region: str, p: dict[str, str]) -> str:
        eid = p.get("InstanceConnectEndpointId")
        if not eid:
            raise EiceError("MissingParameter",
                            "The request must contain the parameter InstanceConnectEndpointId")
        e = self.endpoints.get(region, {}).get(eid)
        if e is None or e.state()[0] == "delete-complete":
            raise EiceError("InvalidInstanceConnectEndpointId.NotFound",
                            f"The instanceConnectEndpoint ID '{eid}' does not exist")
        if e.deleted_at is None:
            e.deleted_at = time.time()
            e.delete_seconds = self.create_seconds
        return e.xml("instanceConnectEndpoint")

    def _reap(self, backend: Any, region: str) -> None:
        """Remove the network interfaces of endpoints whose delete completed."""
        for e in self.endpoints.get(region, {}).values():
            if e.eni_id and e.state()[0] == "delete-complete":
                try:
                    backend.delete_network_interface(e.eni_id)
                except Exception:
                    pass
                e.eni_id = None

    # -- the tunnel ----------------------------------------------------------
    def serve(self, sock: socket.socket, peer: Any) -> None:
        record: dict[str, Any] = {
            "id": len(self.tunnels) + 1, "endpoint_id": None, "private_ip": None,
            "instance_id": None, "remote_port": None, "opened_at": time.time(),
            "closed_at": None, "close_code": None, "close_reason": None, "refused": None,
            "http_status": None, "bytes_in": 0, "bytes_out": 0}
        with self.lock:
            record["id"] = len(self.tunnels) + 1
            self.tunnels.append(record)
            self.live.add(sock)
        try:
            self._serve(sock, record)
        except Exception as exc:  # noqa: BLE001 - a broken client must not kill the listener
            self._note(record, refused=record["refused"] or f"{type(exc).__name__}: {exc}")
        finally:
            with self.lock:
                self.live.discard(sock)
                if record["closed_at"] is None:
                    record["closed_at"] = time.time()
            _shut(sock)

    def _note(self, record: dict[str, Any], **fields: Any) -> None:
        with self.lock:
            record.update(fields)

    def _serve(self, sock: socket.socket, record: dict[str, Any]) -> None:
        sock.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                return
            head += chunk
            if len(head) > 32768:
                return self._refuse(sock, record, Refused(400, "request head too large"))
        head, _, _rest = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, _version = lines[0].split(" ", 2)
        except ValueError:
            return self._refuse(sock, record, Refused(400, "malformed request line"))
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        path, _, raw_query = target.partition("?")
        try:
            plan = self._admit(method, path, raw_query, headers, record)
        except Refused as r:
            return self._refuse(sock, record, r)
        accept = base64.b64encode(hashlib.sha1(
            (headers["sec-websocket-key"] + WS_GUID).encode()).digest()).decode()
        sock.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").encode())
        sock.settimeout(None)
        self._relay(sock, record, plan)

    def _refuse(self, sock: socket.socket, record: dict[str, Any], r: Refused) -> None:
        self._note(record, refused=r.reason, http_status=r.status)
        body = (r.reason + "\n").encode()
        reason = {400: "Bad Request", 403: "Forbidden", 404: "Not Found"}.get(r.status, "Error")
        try:
            sock.sendall(f"HTTP/1.1 {r.status} {reason}\r\nContent-Type: text/plain\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        except OSError:
            pass

    def _admit(self, method: str, path: str, raw_query: str, headers: dict[str, str],
               record: dict[str, Any]) -> dict[str, Any]:
        """Everything AWS checks before the upgrade; the relay plan, or Refused."""
        if path != "/openTunnel":
            raise Refused(404, f"no such path {path}")
        if method != "GET" or headers.get("upgrade", "").lower() != "websocket" \
                or "upgrade" not in headers.get("connection", "").lower() \
                or not headers.get("sec-websocket-key") \
                or headers.get("sec-websocket-version") != "13":
            raise Refused(400, "expected a WebSocket upgrade (GET, Upgrade: websocket, version 13)")
        q = dict(parse_qsl(raw_query, keep_blank_values=True))
        eid, ip, port_s = q.get("instanceConnectEndpointId"), q.get("privateIpAddress"), q.get("remotePort")
        self._note(record, endpoint_id=eid, private_ip=ip, remote_port=port_s)
        region = self._verify_signature(method, path, raw_query, headers, q)
        if not eid or not ip or not port_s:
            raise Refused(400, "instanceConnectEndpointId, privateIpAddress and remotePort are required")
        try:
            port = int(port_s)
            duration = int(q["maxTunnelDuration"]) if "maxTunnelDuration" in q else 3600
            ipaddress.IPv4Address(ip)
        except ValueError:
            raise Refused(400, "remotePort and maxTunnelDuration must be integers, privateIpAddress an IPv4 address")
        if port not in (22, 3389):
            # AWS: EC2 Instance Connect Endpoint connects to ports 22 (SSH) and 3389 (RDP) only.
            raise Refused(400, f"remotePort {port} is not supported: only 22 and 3389")
        if not 1 <= duration <= 3600:
            raise Refused(400, f"maxTunnelDuration {duration} must be between 1 and 3600 seconds")
        with self.lock:
            e = self.endpoints.get(region, {}).get(eid)
        if e is None:
            raise Refused(404, f"instance connect endpoint {eid} not found in {region}")
        state = e.state()[0]
        if state != "create-complete":
            raise Refused(404, f"instance connect endpoint {eid} is {state}")
        host = headers.get("host", "")
        if host != e.dns:
            raise Refused(403, f"Host {host!r} is not the endpoint's DNS name {e.dns}")
        self._authorize(e, q, port, ip, duration)
        return {"endpoint": e, "ip": ip, "port": port, "duration": duration}

    def _secret_for(self, access_key: str, token: str | None) -> str | None:
        if access_key in STATIC_KEYS:
            return STATIC_KEYS[access_key]
        with self.cloud.moto_lock:
            try:
                from moto.iam.models import iam_backends
                for by_partition in iam_backends.values():
                    for iam in by_partition.values():
                        for user in iam.users.values():
                            for key in user.access_keys:
                                if key.access_key_id == access_key and key.status == "Active":
                                    return key.secret_access_key
            except Exception:
                pass
            try:
                from moto.sts.models import sts_backends
                for by_partition in sts_backends.values():
                    for sts in by_partition.values():
                        for role in getattr(sts, "assumed_roles", []):
                            if role.access_key_id == access_key:
                                return role.secret_access_key if role.session_token == token else None
            except Exception:
                pass
        return None

    def _verify_signature(self, method: str, path: str, raw_query: str, headers: dict[str, str],
                          q: dict[str, str]) -> str:
        """The region of a valid signature, or Refused(403)."""
        if q.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256" or "X-Amz-Signature" not in q:
            raise Refused(403, "the request is not signed (X-Amz-Algorithm=AWS4-HMAC-SHA256 expected)")
        cred = q.get("X-Amz-Credential", "").split("/")
        if len(cred) != 5 or cred[4] != "aws4_request":
            raise Refused(403, "malformed X-Amz-Credential")
        access_key, day, region, service = cred[0], cred[1], cred[2], cred[3]
        if service != SERVICE:
            raise Refused(403, f"credential scope names service {service!r}, not {SERVICE!r}")
        if "host" not in q.get("X-Amz-SignedHeaders", "").split(";"):
            raise Refused(403, "the Host header must be signed")
        try:
            signed_at = dt.datetime.strptime(q.get("X-Amz-Date", ""), "%Y%m%dT%H%M%SZ").replace(
                tzinfo=dt.timezone.utc).timestamp()
            expires = int(q.get("X-Amz-Expires", ""))
        except ValueError:
            raise Refused(403, "X-Amz-Date and X-Amz-Expires are required")
        if not q.get("X-Amz-Date", "").startswith(day):
            raise Refused(403, "X-Amz-Date does not match the credential scope's date")
        if expires < 1 or expires > MAX_EXPIRES:
            raise Refused(403, f"X-Amz-Expires must be between 1 and {MAX_EXPIRES}")
        now = time.time()
        if now > signed_at + expires:
            raise Refused(403, "Request has expired (X-Amz-Date + X-Amz-Expires is in the past)")
        if signed_at > now + 300:
            raise Refused(403, "Signature not yet current (X-Amz-Date is in the future)")
        secret = self._secret_for(access_key, q.get("X-Amz-Security-Token"))
        if secret is None:
            raise Refused(403, f"The security token included in the request is invalid (unknown key {access_key})")
        given = q["X-Amz-Signature"]
        if not any(hmac.compare_digest(given, s)
                   for s in expected_signatures(secret, method, path, raw_query, headers, q)):
            raise Refused(403, "The request signature we calculated does not match the signature you provided")
        return region

    def _authorize(self, e: Endpoint, q: dict[str, str], port: int, ip: str, duration: int) -> None:
        cloud = self.cloud
        policy = getattr(cloud, "enforced_policy", None)
        access_key = q.get("X-Amz-Credential", "").split("/")[0]
        if policy is None or access_key not in getattr(cloud, "enforced_keys", []):
            return
        ctx = iampolicy.resource_tag_context(e.tags, "ec2")
        ctx.update({"ec2-instance-connect:remotePort": str(port),
                    "ec2-instance-connect:privateIpAddress": ip,
                    "aws:username": "moto", "aws:RequestedRegion": e.region})
        if "maxTunnelDuration" in q:
            ctx["ec2-instance-connect:maxTunnelDuration"] = str(duration)
        check = iampolicy.Check("ec2-instance-connect:OpenTunnel", e.arn, ctx)
        decision = iampolicy.evaluate(policy, check)
        if decision.allowed:
            return
        with cloud.state_lock:
            # seq: the last API call's (a tunnel is not an API call and has no number of its own).
            cloud.denials.append({"seq": cloud.seq, "service": SERVICE, "api": "OpenTunnel",
                                  "action": check.action, "resource": check.resource})
        _, message, _ = iampolicy.denial(check, decision, f"arn:aws:iam::{self.account}:user/moto", "json")
        raise Refused(403, message)

    # -- after the upgrade ---------------------------------------------------
    def _target(self, e: Endpoint, ip: str, port: int) -> tuple[str | None, tuple[str, int] | None]:
        """(instance id, where its port listens on this machine) or a reason in place of the
        address: what the endpoint's network interface could reach."""
        with self.cloud.moto_lock:
            backend = self.cloud.ec2_backend(e.region)
            inst = None
            for i in backend.all_instances():
                state = getattr(getattr(i, "_state", None), "name", None)
                if i.private_ip == ip and state in ("running", "pending") and i.vpc_id == e.vpc_id:
                    inst = i
                    break
            if inst is None:
                return None, None
            admitted = self._admits(backend, inst, e.group_ids, port)
        if not admitted:
            return inst.id, None
        boxsim = __import__("sys").modules.get("boxsim")
        target = boxsim.port_target(inst.id, port) if boxsim and hasattr(boxsim, "port_target") else None
        return inst.id, target

    @staticmethod
    def _admits(backend: Any, inst: Any, source_groups: list[str], port: int) -> bool:
        group_ids = [g.id for g in (getattr(inst, "security_groups", None) or [])]
        for nic in (getattr(inst, "nics", None) or {}).values():
            for g in getattr(nic, "group_set", None) or []:
                gid = getattr(g, "id", g)
                if gid not in group_ids:
                    group_ids.append(gid)
        for gid in group_ids:
            group = backend.get_security_group_from_id(gid)
            for rule in (getattr(group, "ingress_rules", None) or []) if group else []:
                src = (rule.referenced_group_info or {}).get("GroupId")
                if src not in source_groups:
                    continue
                proto = str(rule.ip_protocol)
                if proto == "-1":
                    return True
                if proto not in ("tcp", "6"):
                    continue
                lo = -1 if rule.from_port is None else int(rule.from_port)
                hi = 65535 if rule.to_port is None else int(rule.to_port)
                if lo <= port <= hi or lo == -1:
                    return True
        return False

    def _relay(self, ws: socket.socket, record: dict[str, Any], plan: dict[str, Any]) -> None:
        tunnel = _Tunnel(ws, record, self.lock)
        iid, target = self._target(plan["endpoint"], plan["ip"], plan["port"])
        self._note(record, instance_id=iid)
        upstream = None
        if target is not None:
            try:
                upstream = socket.create_connection(target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                upstream = None
        if upstream is None:
            tunnel.close(1011, "Unable to connect to target")
            _drain_close(ws)
            return
        tunnel.run(upstream, min(float(plan["duration"]), self.tunnel_limit))


class _Tunnel:
    """One open tunnel: the client's WebSocket and the box's TCP connection, pumped both ways
    until either side ends or the time limit closes it with 1000."""

    def __init__(self, ws: socket.socket, record: dict[str, Any], lock: threading.RLock):
        self.ws, self.record, self.lock = ws, record, lock
        self.send_lock = threading.Lock()
        self.closed = threading.Event()
        self.upstream: socket.socket | None = None

    def send(self, data: bytes) -> None:
        with self.send_lock:
            self.ws.sendall(data)

    def close(self, code: int, reason: str) -> None:
        """Record the tunnel's end and send our close frame (the client's code echoed when it
        closed first; nothing for 1005/1006, which never travel on the wire)."""
        with self.lock:
            first = self.record["close_code"] is None
            if first:
                self.record["close_code"], self.record["close_reason"] = code, reason
                self.record["closed_at"] = time.time()
        if first:
            try:
                if code != 1006:
                    self.send(frame(8, b"" if code == 1005 else close_payload(code, reason)))
            except OSError:
                pass
            # The client answers with its own close; one that never does is cut off.
            cut = threading.Timer(3.0, _shut, args=(self.ws,))
            cut.daemon = True
            cut.start()
        self.closed.set()

    def run(self, upstream: socket.socket, limit: float) -> None:
        self.upstream = upstream
        timer = threading.Timer(limit, self._expire)
        timer.daemon = True
        timer.start()
        pump = threading.Thread(target=self._box_to_client, name="eice-out", daemon=True)
        pump.start()
        try:
            self._client_to_box()
        finally:
            timer.cancel()
            _shut(upstream)
            pump.join(timeout=5)
            upstream.close()

    def _expire(self) -> None:
        self.close(1000, "Tunnel reached its maximum duration")
        _shut(self.upstream)
        _shut_write(self.ws)

    def _count(self, key: str, n: int) -> None:
        with self.lock:
            self.record[key] += n

    def _box_to_client(self) -> None:
        assert self.upstream is not None
        try:
            while not self.closed.is_set():
                data = self.upstream.recv(OUT_CHUNK)
                if not data:
                    break
                self.send(frame(2, data))
                self._count("bytes_out", len(data))
        except OSError:
            pass
        self.close(1000, "Target closed the connection")
        _shut_write(self.ws)

    def _client_to_box(self) -> None:
        assert self.upstream is not None
        while True:
            try:
                _fin, opcode, data = read_frame(self.ws)
            except (WsClosed, OSError):
                self.close(1006, "client went away")
                return
            except ValueError as exc:
                self.close(1002 if "masked" in str(exc) else 1009, str(exc))
                return
            if opcode in (0, 2):
                try:
                    self.upstream.sendall(data)
                except OSError:
                    self.close(1000, "Target closed the connection")
                    return
                self._count("bytes_in", len(data))
            elif opcode == 9:
                self.send(frame(10, data))
            elif opcode == 8:
                self.close(struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 1005, "client closed")
                return
            elif opcode == 1:
                self.close(1003, "text frames are not accepted; send binary frames")
                return
            elif opcode != 10:
                self.close(1002, f"unknown opcode {opcode}")
                return


def _shut(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _shut_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _drain_close(ws: socket.socket) -> None:
    """After our close frame: wait briefly for the client's, then end."""
    ws.settimeout(2)
    try:
        while True:
            _fin, opcode, _data = read_frame(ws)
            if opcode == 8:
                return
    except (WsClosed, OSError, ValueError):
        return
