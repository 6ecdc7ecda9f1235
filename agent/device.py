"""The L2 agent as PID 1 (docs/boot-chain.md): from the bootstrap's hand-off to a serving,
attesting agent running its role's part of the flow.

1. `cidboot-stage: agent start`; read the hand-off (cidboot.stage.handoff.load erases dice.cbor at
   once): CDI_2 + chain for a measured boot; none for an unmeasured one, which then gets an
   ephemeral identity whose evidence says so (verifiers refuse it by default);
2. the bootstrap's DHCP lease after a same-kernel hand-over (cidboot.netboot.dhcp_client.reusable),
   else NIC up + DHCP (user class "cidboot-agent");
3. fetch through the boot config's gateways, verifying each block: the signed manifest (its
   signatures checked again against the boot config's trust anchor), its flow, the signed
   device registry (cidboot.trust.registry, under the manifest's root of trust);
4. the attestation API on port 8000 with the peer endpoints; `cidboot-stage: agent ready url=...`;
5. this role's part of the flow with the orchestrator, inputs exchanged with attested peers;
   each result printed as `cidboot: result <definition>=<json>`; then serve forever.

Everything above step 5 is `boot_agent`, callable on a host with a handoff directory as
`root` and `network=False`, which is how the tests run it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from agent import blockfetch
from agent.attestation_api import AgentServer, Attester, HttpError, Result, deferred_route, serve_api
from cidboot.errors import CidbootError, FormatError, VerificationError
from cidboot.ipld.cid import CID
from cidboot.netboot.bootconfig import BootConfig
from cidboot.stage import events
from cidboot.stage.console import say
from cidboot.stage.handoff import Handoff, HandoffNotFound, load
from cidboot.store.blockstore import Blockstore
from cidboot.trust.appraisal_roots import DeviceRoots
from cidboot.trust.cose_key import decode_public_key, raw_public_bytes
from cidboot.trust.dice import CDI_SIZE, decode_handover, encode_chain, key_from_cdi
from cidboot.trust.manifest import RootOfTrust, SignedManifest, verify_threshold
from cidboot.trust.manifest.signed import KIND_MANIFEST, MAX_ENVELOPE

if TYPE_CHECKING:  # imported where used: the flow's modules run after `agent ready`, TPM and publishing only when configured
    from agent.attested import AttestedAgents
    from agent.audit import ConsoleAudit
    from agent.peers import PeerClient, PeerService
    from agent.publish import PublishTarget
    from agent.verifier import Verifier
    from cidboot.dataflow.model import DataFlow
    from cidboot.trust.appraisal import AppraisalResult
    from cidboot.trust.tpm.appraise import TpmReferences

USER_CLASS = b"cidboot-agent"
PORT = 8000
STORE_DIR = "run/cidboot/agent-store"  # rootfs is RAM: results, provenance and fetched blocks
OPS_DIR = "opt/cidboot/ops"  # imagebuilder.initramfs.OPS: the flow's operation modules
PEER_PATIENCE = 120.0  # seconds a sender keeps trying a peer that is still booting


def is_device_boot(pid: int, argv: Sequence[str]) -> bool:
    """PID 1 with no arguments is the image's /init starting the agent; anything else is the CLI."""
    return pid == 1 and len(argv) <= 1


class AgentBootError(CidbootError):
    """The agent cannot start: the message names the step (handoff, manifest, registry...)."""


def fetch_block(cid: CID, gateways: Sequence[str], store: Blockstore, *, timeout: float = 10.0,
                max_size: int = MAX_ENVELOPE) -> bytes:
    """cidboot.store.gateway.client.fetch_block (after one plain GET: agent.blockfetch), its
    failure as the agent's boot error."""
    try:
        return blockfetch.fetch_block(cid, tuple(gateways), store, timeout=timeout, max_size=max_size,
                                      user_agent="cidboot-agent")
    except CidbootError as e:
        from cidboot.store.gateway.client import BlockUnavailable  # imported already if it raised this

        if isinstance(e, BlockUnavailable):
            raise AgentBootError(f"could not fetch {cid}: {e}") from None
        raise


def ephemeral_attester(**kw: Any) -> Attester:
    """An unmeasured boot has no CDI: a random one with the one-entry chain [its own key], so
    the agent can still answer challenges, and its evidence says it is unmeasured."""
    cdi = os.urandom(CDI_SIZE)
    key = key_from_cdi(cdi)
    return Attester.from_chain(key, encode_chain(key.public_key(), []), **kw)


def read_handoff(root: str | os.PathLike[str]) -> tuple[Handoff, BootConfig, CID]:
    try:
        h = load(root)
    except HandoffNotFound as e:
        raise AgentBootError(f"handoff: {e}: the agent must be started by the bootstrap") from None
    if "handover_check" in h.boot:  # a debug build of the bootstrap asked (cidboot.stage.switch_root)
        from cidboot.stage.switch_root import report_handover_check

        report_handover_check(h.boot, "agent", root=str(root))
    raw = h.boot.get("bootconfig")
    if isinstance(raw, dict):
        raw = json.dumps(raw)
    if not isinstance(raw, str):
        raise AgentBootError("handoff: boot.json carries no boot config")
    cfg = BootConfig.decode(raw.encode())
    mcid = h.boot.get("manifest")
    try:
        return h, cfg, CID.parse(mcid) if isinstance(mcid, str) else cfg.manifest
    except FormatError as e:
        raise AgentBootError(f"handoff: manifest CID: {e}") from None


def network_up(log: Callable[[str], None], handed: Any = None) -> str:
    """The NIC's address: the bootstrap's lease after a same-kernel hand-over (`handed`, the
    hand-off's "lease"), else NIC up, DHCP (user class cidboot-agent), address configured."""
    from cidboot.netboot import dhcp_client

    return dhcp_client.network_up(user_class=USER_CLASS, handed=handed, log=log)[2].ip


@dataclass
class BootedAgent:
    """Everything the running agent holds once it serves; the flow step uses it.

    What only appraising OTHER devices needs (cidboot.trust.appraisal, agent.verifier, agent.peers)
    and what only the flow needs (the audit log, the attested producers) is built on first use,
    not before `agent ready` (`verifier`, `peers`, `service`, `attested`, `audit`): under TCG those
    imports were ~0.15 s of the agent's start. The registry they appraise against (`roots`,
    `tpm_references`) is fetched and verified at start, so a bad registry still stops the boot.
    A failed deferred import fails the request or the flow step that needed it (500, logged;
    the flow's exception), never a check."""

    handoff: Handoff
    config: BootConfig
    manifest_cid: CID
    signed: SignedManifest
    roots: DeviceRoots
    store: Blockstore
    attester: Attester
    server: AgentServer
    ip: str
    root: Path
    console: TextIO | None = None
    publish_to: PublishTarget | None = None  # results' provenance DAGs and the audit log also go there (boot config)
    orchestrator: Any = None  # agent.orchestrator.Orchestrator once the flow runs
    tpm_references: dict[str, TpmReferences] | None = None  # the signed registry's (docs/tpm.md, "Peers")
    allow_unmeasured_peers: bool = False
    peer_patience: float = PEER_PATIENCE
    _built: dict[str, Any] = field(default_factory=dict, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def _get(self, name: str, build: Callable[[], Any]) -> Any:
        """The deferred part `name`, built once (an HTTP thread and the flow may ask at once)."""
        with self._lock:
            if name not in self._built:
                self._built[name] = build()
            return self._built[name]

    @property
    def verifier(self) -> Verifier:
        """Appraises peers' evidence against the registry and the signed manifest."""
        def build() -> Verifier:
            from agent.verifier import Verifier

            return Verifier(self.roots, self.signed.manifest, self.manifest_cid,
                            allow_unmeasured=self.allow_unmeasured_peers, tpm_references=self.tpm_references)
        return self._get("verifier", build)

    @property
    def attested(self) -> AttestedAgents:
        from agent.attested import AttestedAgents

        return self._get("attested", AttestedAgents)

    @property
    def audit(self) -> ConsoleAudit:
        from agent.audit import ConsoleAudit

        return self._get("audit", lambda: ConsoleAudit(self.attester.leaf_key, self.store, self.console))

    @property
    def peers(self) -> PeerClient:
        """The sending side of the peer protocol (boot config `peers`)."""
        def build() -> PeerClient:
            from agent.peers import PeerClient

            return PeerClient(self.attester, self.verifier, {r: list(u) for r, u in self.config.peers.items()},
                              patience=self.peer_patience)
        return self._get("peers", build)

    @property
    def service(self) -> PeerService:
        """The receiving side of the peer protocol, its refusals recorded in the audit log."""
        def build() -> PeerService:
            from agent.peers import PeerService, reasons

            audit = self.audit
            service = PeerService(self.attester, self.verifier, _not_ready)
            service.register = _register(self.attested)
            service.refused = lambda client, res: audit.record(
                "refused", f"inputs from peer {client} ({res.role or (f'claims {res.claimed_role}' if res.claimed_role else 'no role')}, "
                           f"device {res.device_id}): {reasons(res.to_obj())}")
            service.refused_request = lambda client, reason: audit.record("refused", f"inputs from peer {client}: {reason}")
            return service
        return self._get("service", build)

    def audit_head(self) -> CID | None:
        """The audit log's head (None while nothing was recorded, so the log was never built)."""
        audit = self._built.get("audit")
        return audit.head if audit is not None else None

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.server.server_address[1]}"

    def record(self, result: Result) -> None:
        """Keep a result (served on /results), print its console line, publish its provenance."""
        self.server.results.add(result)
        say(f"cidboot: result {result.definition}={json.dumps(result.value, sort_keys=True, default=str)}", self.console)
        events.emit("agent", "result", definition=result.definition, value=json.dumps(result.value, sort_keys=True, default=str), cid=result.provenance)
        if self.publish_to is not None and result.provenance is not None:
            from agent.publish import publish

            publish(self.store, [result.provenance], self.publish_to)

    async def send(self, role: str, blocks: list[tuple[CID, bytes]]) -> None:
        """The orchestrator's `send`: to every agent of `role` after mutual attestation. A peer
        that cannot be reached or is not affirming gets nothing; that is recorded in the audit
        log and on the console, and the flow goes on (it never crashes PID 1)."""
        from agent.peers import PeerError, PeerRefused

        try:
            for res in await self.peers.asend(role, blocks):
                self.audit.record("accepted", f"{role} device {res.device_id} (attested affirming) accepted "
                                  f"{len(blocks)} block(s) from us",
                                  inputs=[c for c, _ in blocks[:1]])
        except (PeerRefused, PeerError) as e:
            self.audit.record("refused", f"not sent to {role}: {e}", inputs=[c for c, _ in blocks[:1]])
            say(f"cidboot: refused: peer: {e}", self.console)
            events.emit("agent", "refused", reason=f"peer: {e}", check="peer", cid=blocks[0][0] if blocks else None)


def load_manifest(cid: CID, cfg: BootConfig, store: Blockstore) -> SignedManifest:
    """The bootstrap verified it fully (rollback, expiry) before measuring it into CDI_2; the
    agent re-checks the signatures against the same anchor, because it acts on the content."""
    signed = SignedManifest.decode(fetch_block(cid, cfg.gateways, store))
    root = signed.manifest.root
    if cfg.trust_anchor:
        try:
            a = cfg.trust_anchor
            anchor = RootOfTrust(tuple(bytes.fromhex(k) for k in a["keys"]), int(a["threshold"]), int(a.get("version", 1)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise AgentBootError(f"boot config trust anchor: {type(e).__name__}: {e}") from None
        if root != anchor and not any(r.root == root for r in signed.rotations):
            raise AgentBootError(f"manifest {cid}: its root is neither the trust anchor nor rotated to from it")
    verify_threshold(signed.signatures, signed.payload(), root, f"manifest {cid}", kind=KIND_MANIFEST)
    return signed


def load_registry(cfg: BootConfig, signed: SignedManifest, store: Blockstore, root: Path) -> DeviceRoots:
    """The signed registry named by the boot config, else a local device-roots.json (development);
    with neither, no peer can be affirmed and none is sent anything."""
    return load_registry_references(cfg, signed, store, root)[0]


def load_registry_references(cfg: BootConfig, signed: SignedManifest, store: Blockstore,
                             root: Path) -> tuple[DeviceRoots, dict[str, TpmReferences] | None]:
    """`load_registry` and the PCR 4/11 references of the fleet's bootstrap UKIs (one set per
    architecture) the signed registry carries (docs/tpm.md, "Peers"): the only source a booted agent takes them from, so without a
    signed registry that has them a TPM peer is never affirming (its PCR 4/11 are a warning)."""
    if cfg.device_registry is not None:
        from cidboot.trust.registry import verify_signed_registry

        reg = verify_signed_registry(fetch_block(cfg.device_registry, cfg.gateways, store), signed.manifest.root)
        return reg.roots, reg.tpm_references
    local = root / "etc/cidboot/device-roots.json"
    return (DeviceRoots.load(local) if local.is_file() else DeviceRoots()), None


def boot_agent(root: str | os.PathLike[str] = "/", *, network: bool = True, host: str = "0.0.0.0", port: int = PORT,
               console: TextIO | None = None, allow_unmeasured_peers: bool = False,
               peer_patience: float = PEER_PATIENCE) -> BootedAgent:
    """Steps 1-4 of the module docstring; returns with the API serving on a daemon thread."""
    base = Path(root)
    say("cidboot-stage: agent start", console)
    events.emit("agent", "start")
    h, cfg, mcid = read_handoff(base)
    quoter = None
    if h.dice is not None:
        ho = decode_handover(h.dice)
        quoter = None
        if "tpm" in h.boot:  # a TPM-measured boot (bootstrap.stage.tpm): evidence carries a fresh quote
            from agent.tpm import TpmQuoter

            quoter = TpmQuoter.from_boot(h.boot, ho.chain)
        if quoter is None:
            attester = Attester.from_cdi(ho.cdi_attest, ho.chain, manifest_cid=mcid, boot_mode="measured", role=cfg.role)
        else:
            attester = Attester.from_cdi(ho.cdi_attest, ho.chain, manifest_cid=mcid, role=cfg.role, tpm=quoter.evidence,
                                         ueid=quoter.ueid())
    else:
        attester = ephemeral_attester(manifest_cid=mcid, boot_mode="unmeasured", role=cfg.role)
    ip = network_up(lambda m: print(f"cidboot: agent: {m}", file=sys.stderr, flush=True),
                    h.boot.get("lease")) if network else host  # dhcp_client.HANDOFF_KEY
    store = Blockstore(base / STORE_DIR)
    signed = load_manifest(mcid, cfg, store)
    if signed.manifest.flow is not None:
        fetch_block(signed.manifest.flow, cfg.gateways, store)  # the flow is one DAG-CBOR block
    roots, tpm_refs = load_registry_references(cfg, signed, store, base)
    server = serve_api(attester, host, port, store=store)
    agent = BootedAgent(h, cfg, mcid, signed, roots, store, attester, server, ip, base, console,
                        tpm_references=tpm_refs, allow_unmeasured_peers=allow_unmeasured_peers,
                        peer_patience=peer_patience)
    if cfg.publish:  # the boot config says where results go (bootstrap serve --publish)
        from agent.publish import PublishTarget

        try:
            agent.publish_to = PublishTarget.parse(cfg.publish)
        except FormatError as e:
            raise AgentBootError(f"boot config publish: {e}") from None
    server.audit_head = agent.audit_head
    # the peer endpoints: agent.peers and appraisal are imported by the first request (agent.peers)
    server.mount(deferred_route("POST", "/peer/session", lambda: agent.service.routes()),
                 deferred_route("POST", "/peer/inputs/", lambda: agent.service.routes()))
    server.start()
    say(f"cidboot-stage: agent ready url={agent.url}", console)
    events.emit("agent", "ready", identity=events.Identity(attester.leaf_key, attester.chain,
                                                            quoter.key_binding() if quoter is not None else None)
                if h.dice is not None else None, bootconfig=cfg, url=agent.url, port=server.server_address[1], manifest=mcid, role=cfg.role)
    return agent


def _register(attested: AttestedAgents) -> Callable[[AppraisalResult], None]:
    def register(res: AppraisalResult) -> None:
        try:
            attested.add(res)
        except VerificationError as e:  # affirming but no role claimed: not a producer we can place
            raise HttpError(403, str(e)) from None
    return register


def _not_ready(blocks: Any, sender: AppraisalResult) -> None:
    """Inputs that arrive before the orchestrator runs: the sender retries (PeerUnavailable)."""
    raise HttpError(503, "this agent's flow has not started yet: retry")


FlowStep = Callable[[BootedAgent], Any]


def flow_context(agent: BootedAgent) -> tuple[Any, DataFlow]:
    """The orchestrator's FlowContext from the signed manifest: its flow block, placement and
    policies; the alias key; own measurements and the manifest's reference values; the flow
    authority = the manifest's root-of-trust keys."""
    from agent.identity import references
    from agent.orchestrator import FlowContext
    from cidboot.dataflow import checks
    from cidboot.ipld import dagcbor
    from cidboot.trust.private import carried

    m = agent.signed.manifest
    assert m.flow is not None
    try:  # the same checks imagebuilder ran before signing (cidboot.dataflow.checks): one reading of a flow
        # an encrypted image's manifest names the flow's ciphertext; the plain block is in the image
        # (cidboot.trust.private.carried); the flow keeps its CID m.flow in provenance either way
        block = carried.flow_block(agent.root, m)
        doc = {"dataflow": dagcbor.decode(agent.store.get(m.flow) if block is None else block),
               "placement": m.placement, "policies": m.policies}
        flow = checks.checked(doc, modules=checks.modules_beside(agent.root / OPS_DIR), origin=f"flow {m.flow}")
    except CidbootError as e:
        raise AgentBootError(f"flow {m.flow}: {e}") from None
    authority = frozenset(raw_public_bytes(decode_public_key(k)) for k in m.root.keys)
    ctx = FlowContext(flow, m.flow, agent.config.role, agent.attester.leaf_key, placement=m.placement,
                      policies=m.policies, measurements=agent.attester.measurements,
                      references=references(m, agent.attester.measurements), authority_keys=authority,
                      owner=m.sealing_owner)
    return ctx, flow


def _shown(r: Any) -> Any:
    """A result's value as the console, /results and the fleet events show it: a sealed one
    (the flow has an owner) only as its sealed-value CID, never the plaintext."""
    return r.value if r.sealed is None else {"sealed": str(r.sealed)}


def run_flow(agent: BootedAgent, *, remote_wait: float = 300.0) -> list[Any]:
    """This role's part of the flow with agent.orchestrator: its operations from the image's ops
    directory, outputs for other roles sent to attested peers, peers' inputs accepted from the
    peer endpoints, each result recorded (console line, /results, publishing)."""
    import asyncio  # here, not at the top: the flow runs after `agent ready`, start-up need not wait for it

    from agent.orchestrator import Orchestrator, load_operations

    if agent.signed.manifest.flow is None:
        say("cidboot: agent: the manifest names no flow: serving attestation only", agent.console)
        return []
    ctx, flow = flow_context(agent)
    local = [op for op in flow.operations if ctx.local(op)]
    ops = load_operations(flow, agent.root / OPS_DIR, names=local)
    orch = Orchestrator(ctx, ops, agent.store, attested=agent.attested, audit=agent.audit, send=agent.send,
                        remote_wait=remote_wait,
                        on_result=lambda r: agent.record(Result(r.definition, _shown(r), r.cid)))

    agent.orchestrator = orch

    async def go() -> list[Any]:
        loop = asyncio.get_running_loop()

        def accept(blocks: list[tuple[CID, bytes]], sender: AppraisalResult) -> Any:
            # peers' inputs are handed to this loop, never run beside it on the HTTP thread
            return asyncio.run_coroutine_threadsafe(_on_loop(orch.accept, blocks, sender), loop).result(60)

        agent.service.accept = accept
        try:
            return await orch.run()
        finally:
            agent.service.accept = orch.accept  # after the run: the orchestrator is idle, call it directly

    results = asyncio.run(go())
    if agent.publish_to is not None and agent.audit.head is not None:
        from agent.publish import publish

        publish(agent.store, [agent.audit.head], agent.publish_to)  # results went one by one (record)
    say(f"cidboot: agent: flow done: {len(results)} result(s), audit {agent.audit.head}", agent.console)
    return results


async def _on_loop(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def main(root: str | os.PathLike[str] = "/", *, network: bool = True, host: str = "0.0.0.0", port: int = PORT,
         flow: FlowStep | None = run_flow, serve: bool = True, console: TextIO | None = None) -> BootedAgent:
    """The PID-1 entry (agent/__main__.py). Errors print `cidboot: fatal: ...` and propagate, so
    cidboot.stage.pid1.run_stage powers off."""
    try:
        agent = boot_agent(root, network=network, host=host, port=port, console=console)
        if flow is not None:
            flow(agent)
    except CidbootError as e:
        say(f"cidboot: fatal: {e}", console)
        events.emit("agent", "fatal", reason=str(e))
        raise
    if serve:
        threading.Event().wait()  # the HTTP thread serves; PID 1 must not exit
    return agent
