"""DHCP/BOOTP packets with the PXE options (RFC 2131, 2132, 4578), parsed strictly.

Shared by the boot server and the L0 firmware's client. Parsing is our own, byte by byte, so
that every malformed packet gets a precise reason (truncated option, wrong length, too many
options...). Encoding is ours too, for both sides: `encode_request` (clients: the firmware, the
bootstrap, the agent, tests and benches) and `build_reply` (the boot server), so one module holds
the wire format and the guests never import scapy (which stays a test and load-generation tool).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from cidboot.errors import FormatError
from cidboot.netboot import ipv4

MAGIC = b"\x63\x82\x53\x63"
BOOTP_HEADER = 236
MAX_OPTIONS = 96  # a real client sends a few dozen; more is an attack on our parser

DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
MSG_NAMES = {DISCOVER: "DISCOVER", OFFER: "OFFER", REQUEST: "REQUEST", DECLINE: "DECLINE", ACK: "ACK",
             NAK: "NAK", RELEASE: "RELEASE", INFORM: "INFORM"}

OPT_REQUESTED_IP, OPT_MSG_TYPE, OPT_SERVER_ID, OPT_PARAMS = 50, 53, 54, 55
OPT_VENDOR_CLASS, OPT_CLIENT_ID, OPT_USER_CLASS = 60, 61, 77
OPT_CLIENT_ARCH, OPT_CLIENT_NDI, OPT_CLIENT_UUID = 93, 94, 97
OPT_HOSTNAME, OPT_OVERLOAD = 12, 52

# RFC 4578 client system architecture types -> what we call them
ARCH_X86_BIOS, ARCH_X86_64_UEFI_BC, ARCH_X86_64_UEFI, ARCH_ARM64_UEFI = 0, 7, 9, 11
ARCH_X86_64_UEFI_HTTP, ARCH_ARM64_UEFI_HTTP = 16, 19  # UEFI HTTP Boot (IANA processor architecture types)
ARCH_NAMES = {0: "x86-bios", 6: "x86-uefi", 7: "x86_64-uefi", 9: "x86_64-uefi", 10: "arm32-uefi", 11: "arm64-uefi",
              16: "x86_64-uefi-http", 19: "arm64-uefi-http"}

_FIXED_LEN = {OPT_MSG_TYPE: 1, OPT_REQUESTED_IP: 4, OPT_SERVER_ID: 4, OPT_CLIENT_NDI: 3, OPT_CLIENT_UUID: 17, 51: 4}


class DhcpFormatError(FormatError):
    """A DHCP packet is malformed (the message says which field or option)."""


@dataclass
class DhcpPacket:
    """One BOOTP/DHCP message, fixed fields and options (`parse` fills it, strictly)."""

    op: int
    xid: int
    secs: int
    flags: int
    ciaddr: str
    yiaddr: str
    siaddr: str
    giaddr: str
    mac: str
    sname: bytes
    file: bytes
    options: dict[int, bytes] = field(default_factory=dict)

    @property
    def msg_type(self) -> int:
        return self.options[OPT_MSG_TYPE][0]

    @property
    def msg_name(self) -> str:
        return MSG_NAMES.get(self.msg_type, str(self.msg_type))

    @property
    def vendor_class(self) -> str:
        return self.options.get(OPT_VENDOR_CLASS, b"").decode("ascii", "replace")

    @property
    def is_pxe(self) -> bool:
        return self.vendor_class.startswith("PXEClient")

    @property
    def is_http_boot(self) -> bool:
        """UEFI HTTP Boot clients say "HTTPClient" (UEFI 2.x, 24.7.2) and want a URL as boot file."""
        return self.vendor_class.startswith("HTTPClient")

    @property
    def is_ipxe(self) -> bool:
        """iPXE says so in its user class; chaining it again would loop forever."""
        return b"iPXE" in self.options.get(OPT_USER_CLASS, b"")

    @property
    def client_arch(self) -> int | None:
        raw = self.options.get(OPT_CLIENT_ARCH)
        return struct.unpack(">H", raw[:2])[0] if raw else None

    @property
    def client_uuid(self) -> str | None:
        raw = self.options.get(OPT_CLIENT_UUID)
        if not raw:
            return None
        u = raw[1:].hex()
        return f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"

    @property
    def requested_ip(self) -> str | None:
        raw = self.options.get(OPT_REQUESTED_IP)
        return ipv4.text(raw) if raw else None

    @property
    def server_id(self) -> str | None:
        raw = self.options.get(OPT_SERVER_ID)
        return ipv4.text(raw) if raw else None


def _check_option(code: int, value: bytes) -> None:
    """Check one option's value, after RFC 3396 concatenation of its fragments."""
    want = _FIXED_LEN.get(code)
    if want is not None and len(value) != want:
        raise DhcpFormatError(f"option {code} must be {want} bytes, got {len(value)}")
    if code == OPT_MSG_TYPE and not 1 <= value[0] <= 8:
        raise DhcpFormatError(f"option 53: unknown message type {value[0]}")
    if code == OPT_CLIENT_ARCH and (not value or len(value) % 2):
        raise DhcpFormatError(f"option 93 must be a non-empty list of 16-bit types, got {len(value)} bytes")
    if code == OPT_CLIENT_UUID and value[0] != 0:
        raise DhcpFormatError(f"option 97: unknown UUID type {value[0]}")
    if code == OPT_OVERLOAD:
        raise DhcpFormatError("option 52 (overload into sname/file) is not supported")


def parse(data: bytes) -> DhcpPacket:
    """Parse a BOOTP/DHCP packet; every defect raises DhcpFormatError with its reason.

    A repeated option is concatenated (RFC 3396) only where that can apply: a fixed-length
    option (message type, requested address, server identifier, lease time, UUID, NDI) fits in
    one option and is never split, so a second copy is an ambiguity we refuse rather than guess
    (two server identifiers once made the server crash on an 8-byte address). Every option is
    checked after concatenation, so the properties below never see a malformed value.
    """
    if len(data) < BOOTP_HEADER + len(MAGIC):
        raise DhcpFormatError(f"truncated: {len(data)} bytes, a DHCP packet has at least {BOOTP_HEADER + 4}")
    op, htype, hlen, _hops, xid, secs, flags = struct.unpack(">BBBBIHH", data[:12])
    if op not in (1, 2):
        raise DhcpFormatError(f"op {op} is neither BOOTREQUEST nor BOOTREPLY")
    if htype != 1 or hlen != 6:
        raise DhcpFormatError(f"only Ethernet clients are served (htype {htype}, hlen {hlen})")
    ips = [ipv4.text(data[i : i + 4]) for i in (12, 16, 20, 24)]
    mac = data[28:34].hex(":")
    if data[BOOTP_HEADER : BOOTP_HEADER + 4] != MAGIC:
        raise DhcpFormatError("no DHCP magic cookie: a plain BOOTP packet is not served")
    options: dict[int, bytes] = {}
    pos, end, count = BOOTP_HEADER + 4, len(data), 0
    while pos < end:
        code = data[pos]
        if code == 0:
            pos += 1
            continue
        if code == 255:
            break
        if pos + 1 >= end:
            raise DhcpFormatError(f"option {code}: truncated before its length byte")
        length = data[pos + 1]
        if pos + 2 + length > end:
            raise DhcpFormatError(f"option {code}: length {length} runs past the end of the packet")
        value = data[pos + 2 : pos + 2 + length]
        if length == 0 and code in _FIXED_LEN | {OPT_CLIENT_ARCH: 0, OPT_VENDOR_CLASS: 0}:
            raise DhcpFormatError(f"option {code}: empty")
        count += 1
        if count > MAX_OPTIONS:
            raise DhcpFormatError(f"more than {MAX_OPTIONS} options")
        if code in options and code in _FIXED_LEN:
            raise DhcpFormatError(f"option {code} repeated: a {_FIXED_LEN[code]}-byte option is never split "
                                  "(RFC 3396 concatenation does not apply)")
        if code == OPT_OVERLOAD:
            _check_option(code, value)
        # RFC 3396: a repeated (variable-length) option is concatenated
        options[code] = options.get(code, b"") + value
        pos += 2 + length
    else:
        raise DhcpFormatError("options not terminated by an end option (255)")
    for code, value in options.items():
        _check_option(code, value)
    if OPT_MSG_TYPE not in options:
        raise DhcpFormatError("no option 53: not a DHCP message")
    return DhcpPacket(op, xid, secs, flags, ips[0], ips[1], ips[2], ips[3], mac,
                      data[44:108].rstrip(b"\0"), data[108:236].rstrip(b"\0"), options)


OPT_SUBNET_MASK, OPT_ROUTER, OPT_LEASE_TIME, OPT_MAX_SIZE = 1, 3, 51, 57
OPT_TFTP_SERVER, OPT_BOOTFILE = 66, 67
DEFAULT_PARAMS = bytes([OPT_SUBNET_MASK, OPT_ROUTER, OPT_LEASE_TIME, OPT_SERVER_ID, OPT_VENDOR_CLASS,
                        OPT_TFTP_SERVER, OPT_BOOTFILE])


def _opt(code: int, value: bytes) -> bytes:
    if not 0 < len(value) <= 255:
        raise DhcpFormatError(f"option {code}: value of {len(value)} bytes cannot be encoded")
    return bytes([code, len(value)]) + value


def encode_request(mac: str, msg_type: int, *, xid: int, vendor_class: bytes | None = b"PXEClient:Arch:00000:UNDI:002001",
                   arch: int | None = ARCH_X86_BIOS, requested_ip: str | None = None, server_id: str | None = None,
                   user_class: bytes | None = None, ciaddr: str = "0.0.0.0", broadcast: bool = True, secs: int = 0,
                   params: bytes | None = DEFAULT_PARAMS, uuid: bytes | None = None) -> bytes:
    """A client's BOOTREQUEST (DISCOVER, REQUEST, ...), byte by byte without scapy: the guests'
    DHCP client runs under TCG, where importing scapy alone takes many seconds.

    `user_class` goes into option 77 as given (iPXE sends its name raw, not RFC 3004 framed);
    `uuid` (16 bytes) becomes option 97 (type 0). The packet is padded to the 300-byte BOOTP
    minimum that some servers and relays insist on.
    """
    try:
        chaddr = bytes.fromhex(mac.replace(":", "").replace("-", ""))
    except ValueError:
        raise DhcpFormatError(f"not a MAC address: {mac!r}") from None
    if len(chaddr) != 6:
        raise DhcpFormatError(f"not a MAC address: {mac!r}")
    if not 1 <= msg_type <= 8:
        raise DhcpFormatError(f"unknown message type {msg_type}")
    head = struct.pack(">BBBBIHH", 1, 1, 6, 0, xid & 0xFFFFFFFF, secs & 0xFFFF, 0x8000 if broadcast else 0)
    head += ipv4.packed(ciaddr) + bytes(12) + chaddr + bytes(10) + bytes(64 + 128)
    opts = [_opt(OPT_MSG_TYPE, bytes([msg_type]))]
    if requested_ip:
        opts.append(_opt(OPT_REQUESTED_IP, ipv4.packed(requested_ip)))
    if server_id:
        opts.append(_opt(OPT_SERVER_ID, ipv4.packed(server_id)))
    opts.append(_opt(OPT_MAX_SIZE, struct.pack(">H", 1500)))
    if params:
        opts.append(_opt(OPT_PARAMS, params))
    if vendor_class:
        opts.append(_opt(OPT_VENDOR_CLASS, vendor_class))
    if arch is not None:
        opts.append(_opt(OPT_CLIENT_ARCH, struct.pack(">H", arch)))
        opts.append(_opt(OPT_CLIENT_NDI, b"\x01\x02\x01"))  # UNDI 2.1, as PXE ROMs send it
    if uuid is not None:
        if len(uuid) != 16:
            raise DhcpFormatError(f"client UUID must be 16 bytes, got {len(uuid)}")
        opts.append(_opt(OPT_CLIENT_UUID, b"\0" + uuid))
    if user_class:
        opts.append(_opt(OPT_USER_CLASS, user_class))
    pkt = head + MAGIC + b"".join(opts) + b"\xff"
    return pkt + bytes(max(0, 300 - len(pkt)))


OPT_RELAY_AGENT = 82


def build_reply(req: DhcpPacket, msg_type: int, *, server_ip: str, yiaddr: str = "0.0.0.0", siaddr: str | None = None,
                boot_file: str = "", netmask: str | None = None, lease_seconds: int | None = None,
                pxe: bool = False, vendor_class: bytes = b"PXEClient", router: str | None = None) -> bytes:
    """A BOOTREPLY for `req`: same xid, flags, giaddr and chaddr; ciaddr echoed in an ACK
    (RFC 2131 table 3); options in the order 53, 54, 51, 1, 60 + 97 (PXE: RFC 4578 says a PXE
    server echoes the client's UUID), 67, and the relay agent's option 82 echoed last, as
    RFC 3046 requires. The boot file also goes into the BOOTP `file` field, which older PXE ROMs
    read instead of option 67. `vendor_class` is what a `pxe` reply says in option 60: UEFI HTTP
    Boot clients need "HTTPClient" there to take the boot file as a URL. `router` (option 3): a
    client behind a relay reaches the boot server through it. Padded to the 300-byte BOOTP minimum."""
    if not 1 <= msg_type <= 8:
        raise DhcpFormatError(f"unknown message type {msg_type}")
    name = boot_file.encode()
    if len(name) > 127:
        raise DhcpFormatError(f"boot file name of {len(name)} bytes does not fit the BOOTP file field (127)")
    try:
        chaddr = bytes.fromhex(req.mac.replace(":", ""))
        ips = b"".join(ipv4.packed(a) for a in (
            req.ciaddr if msg_type == ACK else "0.0.0.0", yiaddr, siaddr or "0.0.0.0", req.giaddr))
        server = ipv4.packed(server_ip)
        mask = ipv4.packed(netmask) if netmask else None
        gw = ipv4.packed(router) if router else None
    except ValueError as e:
        raise DhcpFormatError(f"reply: {e}") from None
    head = struct.pack(">BBBBIHH", 2, 1, 6, 0, req.xid & 0xFFFFFFFF, 0, req.flags & 0xFFFF) + ips
    head += chaddr.ljust(16, b"\0") + bytes(64) + name.ljust(128, b"\0")
    opts = [_opt(OPT_MSG_TYPE, bytes([msg_type])), _opt(OPT_SERVER_ID, server)]
    if lease_seconds is not None:
        opts.append(_opt(OPT_LEASE_TIME, struct.pack(">I", lease_seconds)))
    if mask is not None:
        opts.append(_opt(OPT_SUBNET_MASK, mask))
    if gw is not None:
        opts.append(_opt(OPT_ROUTER, gw))
    if pxe:
        opts.append(_opt(OPT_VENDOR_CLASS, vendor_class))
        if OPT_CLIENT_UUID in req.options:
            opts.append(_opt(OPT_CLIENT_UUID, req.options[OPT_CLIENT_UUID]))
    if name:
        opts.append(_opt(OPT_BOOTFILE, name))
    if OPT_RELAY_AGENT in req.options:
        opts.append(_opt(OPT_RELAY_AGENT, req.options[OPT_RELAY_AGENT]))
    pkt = head + MAGIC + b"".join(opts) + b"\xff"
    return pkt + bytes(max(0, 300 - len(pkt)))


def build_request(mac: str, msg_type: int, *, xid: int, vendor_class: bytes = b"PXEClient:Arch:00000:UNDI:002001",
                  arch: int | None = ARCH_X86_BIOS, requested_ip: str | None = None, server_id: str | None = None,
                  user_class: bytes | None = None) -> bytes:
    """A client's DISCOVER/REQUEST (tests and the load benchmark); kept for its callers, now
    built by `encode_request` (no scapy)."""
    return encode_request(mac, msg_type, xid=xid, vendor_class=vendor_class, arch=arch, requested_ip=requested_ip,
                          server_id=server_id, user_class=user_class)
