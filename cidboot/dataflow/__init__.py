"""The one dataflow model, its checks and (later) provenance.

Owns what a flow *means*: the model (today `cidboot/dataflow/model.py`, moving here as `model.py`),
auto-flow, and the semantic checks (`checks.py`) that `imagebuilder lock|build|inspect`,
`agent run`, the agent on a device and the QEMU harness all call, so a flow is read one way
everywhere: a flow the builder signs is a flow the agent runs, and the reverse. `source.py`
keeps the position of every value of a YAML flow so each problem is reported as
`file:line:col: dotted.key: message` by every tool.

May import only `cidboot.errors` and the IPLD-level modules (cid, dagcbor, multihash...);
PyYAML only lazily inside `source.py` (host tools; the device image carries no PyYAML).
Never imports imagebuilder, agent, bootstrap or the harness: they import this.
"""
