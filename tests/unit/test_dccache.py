"""The dataclass method code table: the stage's hook (cidboot.stage.dccache) and the builder's
recording (imagebuilder.dccache). The whole-image side (the table in the agent layer, the same
bytes from two builds) is in tests/integration/test_build_repro_integration.py."""

from __future__ import annotations

import collections
import dataclasses
import marshal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from cidboot.stage import dccache
from imagebuilder import dccache as builder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def hooked(monkeypatch: pytest.MonkeyPatch) -> None:
    """dataclasses.exec and collections.eval are put back after each test (install sets them on the real modules)."""
    monkeypatch.delattr(dataclasses, "exec", raising=False)
    monkeypatch.delattr(collections, "eval", raising=False)
    monkeypatch.setattr(dccache, "stats", {"hits": 0, "misses": 0})


def _recording() -> list[str]:
    texts: list[str] = []

    def rec(source: object, g: dict[str, object] | None = None, ns: dict[str, object] | None = None, /) -> None:
        if isinstance(source, str):
            texts.append(source)
        exec(source, g, ns)  # type: ignore[arg-type]

    dataclasses.exec = rec  # type: ignore[attr-defined]
    return texts


def _point() -> type:
    @dataclasses.dataclass(frozen=True)
    class Point:
        """A frozen dataclass: __init__, __repr__, __eq__, __hash__, __setattr__, __delattr__."""

        x: int
        y: int = 0
        tags: list[str] = dataclasses.field(default_factory=list, compare=False)

    return Point


def test_a_class_made_from_the_table_is_the_class_compiled_now(hooked: None, tmp_path: Path) -> None:
    texts = _recording()
    _point()
    assert len(texts) == 6
    path = tmp_path / "t.marshal"
    path.write_bytes(dccache.encode([("exec", t, dccache.compile_text(t)) for t in texts]))
    assert dccache.install(str(path)) == 6
    P = _point()
    assert dccache.stats == {"hits": 6, "misses": 0}
    p = P(1)
    assert p == P(1, 0, ["other"]) and p != P(2) and hash(p) == hash(P(1))
    assert repr(p) == "_point.<locals>.Point(x=1, y=0, tags=[])"
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.x = 3
    assert P(1).tags is not P(1).tags
    assert vars(P)["__init__"].__code__.co_filename == "<string>"


def test_a_text_not_in_the_table_compiles_as_dataclasses_would(hooked: None, tmp_path: Path) -> None:
    path = tmp_path / "t.marshal"
    path.write_bytes(dccache.encode([("exec", "x = 1", dccache.compile_text("x = 1"))]))
    assert dccache.install(str(path)) == 1
    P = _point()
    assert dccache.stats == {"hits": 0, "misses": 6}
    assert P(1, 2) == P(1, 2) and repr(P(1, 2)).endswith("Point(x=1, y=2, tags=[])")
    # this module has `from __future__ import annotations`; dataclasses.py does not, and neither does
    # the code the hook compiles (or the builder's): annotations are evaluated, not strings
    ns: dict[str, object] = {}
    dataclasses.exec("def f(a: int) -> None: pass", {}, ns)  # type: ignore[attr-defined]
    assert ns["f"].__annotations__ == {"a": int, "return": None}
    assert dccache.compile_text("def f(a: int): pass").co_flags == compile("def f(a: int): pass", "<string>", "exec",
                                                                          dont_inherit=True).co_flags


def test_a_bad_entry_or_another_text_under_the_same_crc_is_compiled_instead(hooked: None) -> None:
    text = "y = 2"
    good = dccache.decode(dccache.encode([("exec", text, compile("y = 3", "<string>", "exec"))]))
    ns: dict[str, object] = {}
    dccache.hook(good)(text, {}, ns)
    assert ns["y"] == 3 and dccache.stats == {"hits": 1, "misses": 0}  # the table's code runs: it is the measured one
    (back, size), = good.index[zlib.crc32(text.encode())]
    three = compile("y = 3", "<s>", "exec")
    for entry in (b"garbage", marshal.dumps("not a triple"), marshal.dumps(("exec", "y = 22", three)),
                  marshal.dumps(("eval", text, three)), marshal.dumps(("exec", text, "not code"))):
        data = marshal.dumps((dccache.FORMAT, sys.implementation.cache_tag, {zlib.crc32(text.encode()): ((len(entry), len(entry)),)})) + entry
        dccache.stats.update(hits=0, misses=0)
        ns = {}
        dccache.hook(dccache.decode(data))(text, {}, ns)
        assert ns["y"] == 2 and dccache.stats == {"hits": 0, "misses": 1}, entry


@pytest.mark.parametrize("data", [b"", b"\x00junk", marshal.dumps(("other/1", sys.implementation.cache_tag, {})),
                                  marshal.dumps((dccache.FORMAT, "cpython-399", {})),
                                  marshal.dumps((dccache.FORMAT, sys.implementation.cache_tag, [("t", 1)]))])
def test_no_table_or_a_foreign_one_leaves_dataclasses_alone(hooked: None, tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "t.marshal"
    path.write_bytes(data)
    assert dccache.install(str(path)) == 0
    assert dccache.install(str(tmp_path / "absent")) == 0
    assert "exec" not in vars(dataclasses)
    with pytest.raises(ValueError):
        dccache.decode(data)


def test_encode_is_in_text_order_and_a_lookup_reads_only_its_entry() -> None:
    code = [("exec", t, dccache.compile_text(t)) for t in ("b = 1", "a = 2")] + [("eval", "3", dccache.compile_text("3", "eval"))]
    data = dccache.encode(code)
    assert data == dccache.encode(list(reversed(code)))
    table = dccache.decode(data)
    assert len(table) == 3 and data.index(b"a = 2") < data.index(b"b = 1")
    assert table.get("a = 2") == code[1][2] and table.get("b = 1") == code[0][2] and table.get("c = 3") is None
    assert table.get("3", "eval") == code[2][2] and table.get("3") is None


def test_a_namedtuple_made_from_the_table_is_the_one_compiled_now(hooked: None, tmp_path: Path) -> None:
    text = "lambda _cls, a, b: _tuple_new(_cls, (a, b))"
    path = tmp_path / "t.marshal"
    path.write_bytes(dccache.encode([("eval", text, dccache.compile_text(text, "eval"))]))
    assert dccache.install(str(path)) == 1
    Pair = collections.namedtuple("Pair", "a b")
    assert dccache.stats == {"hits": 1, "misses": 0}
    assert Pair(1, b=2) == (1, 2) and Pair._make([3, 4]).b == 4 and repr(Pair(1, 2)) == "Pair(a=1, b=2)"
    collections.namedtuple("Triple", "a b c")
    assert dccache.stats == {"hits": 1, "misses": 1}


def test_builder_records_the_stage_start_path_and_compiles_the_same_bytes_twice() -> None:
    roots = ["cidboot.stage.pid1", "firmware.stage"]
    texts = builder.record(roots, [REPO])
    assert texts == sorted(set(texts)) and len(texts) > 20
    assert any(m == "exec" and "def __init__(" in t and "ifname:_type_ifname" in t for m, t in texts)
    assert any(m == "eval" and t.startswith("lambda _cls, ") for m, t in texts)  # urllib.parse's namedtuples  # firmware.netboot.Network
    a, b = builder.compile_table(texts, REPO), builder.compile_table(reversed(texts), REPO)
    assert a == b
    assert len(dccache.decode(a)) == len(texts) and all(dccache.decode(a).get(t, m) is not None for m, t in texts)
    # a fresh interpreter with the table importing the same start path compiles nothing
    site = [p for p in sys.path if Path(p).name == "site-packages"]
    out = subprocess.run([sys.executable, "-I", "-S", "-B", "-c",
                          "import sys; sys.path[:0] = [sys.argv[1]]; sys.path += sys.argv[3:]\n"
                          "from cidboot.stage import dccache, deferred\n"
                          "deferred.install(); dccache.install(sys.argv[2])\n"
                          "import cidboot.stage.pid1, firmware.stage\n"
                          "print(dccache.stats['hits'], dccache.stats['misses'])",
                          str(REPO), "/dev/stdin", *site], input=a, capture_output=True, check=True)
    hits, misses = map(int, out.stdout.split())
    assert misses == 0 and hits > 60  # fewer than recorded: PID 1 defers inspect (and its namedtuples)


def test_builder_records_the_project_modules_a_stage_ships_but_runs_no_main(tmp_path: Path) -> None:
    graph = {"firmware.stage": REPO / "firmware/stage.py", "firmware.__main__": REPO / "firmware/__main__.py",
             "cidboot.stage": REPO / "cidboot/stage/__init__.py", "json": tmp_path / "json/__init__.py",
             "_ssl": tmp_path / "_ssl.so",
             # a flow inside the checkout (make demo builds under out/): its operations are not project code
             "ops": REPO / "out/demo/work/firmware/ops.py"}
    assert builder.project_modules(graph, REPO) == ["cidboot.stage", "firmware.stage"]


def test_builder_names_the_step_that_failed() -> None:
    with pytest.raises(builder.DataclassTableError, match="record failed: ModuleNotFoundError"):
        builder.record(["cidboot.no_such_module"], [REPO])


def test_builder_records_the_images_own_packages_not_the_build_hosts(tmp_path: Path) -> None:
    """The image's packages (Debian's dist-packages, the unpacked wheels) come before this
    interpreter's site-packages: a module the guest carries is recorded from the guest's copy
    (python3-cryptography 38 in the image, the wheel 48 on the host), never from the host's."""
    (tmp_path / "cbor2").mkdir()
    (tmp_path / "cbor2/__init__.py").write_text(
        "import dataclasses\n@dataclasses.dataclass\nclass GuestCopy:\n    only_in_the_guest_copy: int\n")
    graph = {"cidboot.trust.cose": REPO / "cidboot/trust/cose.py"}
    texts = builder.record(builder.project_modules(graph, REPO), [REPO, tmp_path])
    assert any("only_in_the_guest_copy" in t for _, t in texts)
    assert not any("only_in_the_guest_copy" in t for _, t in builder.record(["cidboot.trust.cose"], [REPO]))
    assert builder.table(graph, REPO, [tmp_path]) != builder.table(graph, REPO)  # table() passes them on
