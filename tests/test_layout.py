"""barlow.layout: every path from identity, shared weights folders, runs finished in the earlier layout
kept where they are, and no module parsing identity back out of a path."""
from __future__ import annotations

import ast
from pathlib import Path

from barlow import layout

REPO = Path(__file__).resolve().parents[1]


def test_paths_from_identity():
    assert layout.run_key("bt", None) == "bt" and layout.run_key("bt", 3) == "bt/seed3"
    assert layout.results_dir("res", True) == "res/smoke"
    assert layout.probes_file("res", "fmnist", "bt/seed3") == "res/fmnist/bt/seed3/probes.json"
    assert layout.pass_file("res", "fmnist", "bt", "avgpool") == "res/fmnist/bt/probes/avgpool.json"
    assert layout.pass_checkpoint("res/fmnist/bt/probes/avgpool.json") == "res/fmnist/bt/probes/avgpool.checkpoint.pt"
    assert layout.beton("res", "fmnist", "val") == "res/data/fmnist/val.beton"
    assert layout.pretrain_log("res", "res/fmnist/weights/k") == "res/logs/pretrain/fmnist/weights/k.log"


def test_weights_key_is_readable_and_changes_with_any_weights_setting():
    w = {"model": {"arch": "resnet18"}, "data": {}, "pretrain": {"init": "barlow_twins", "epochs": 2, "seed": 0}}
    key = layout.weights_key(w)
    assert key.startswith("resnet18-bt-ep2-seed0-") and len(key.rsplit("-", 1)[1]) == 10
    assert layout.weights_key(w) == key  # stable
    other = {**w, "pretrain": {**w["pretrain"], "lr": 0.1}}
    assert layout.weights_key(other) != key
    assert layout.weights_key({**w, "pretrain": {"init": "random", "seed": 1}}).startswith("resnet18-random-seed1-")


def test_equal_weights_share_one_folder_and_an_earlier_runs_folder_is_kept(tmp_path):
    res = str(tmp_path)
    runs = [("a", "fm", "k1"), ("b", "fm", "k1"), ("c", "fm", "k2")]
    w = layout.assign_weights(res, runs)
    assert w["a"].dir == w["b"].dir == f"{res}/fm/weights/k1" and w["a"].runs == ("a", "b")
    assert w["c"].dir == f"{res}/fm/weights/k2" and w["c"].runs == ("c",)
    # b was pretrained in the layout before weights folders (its own folder holds backbone.pth; a half-done
    # c holds checkpoint.pt): both stay where they are, a still shares k1's folder alone
    for key, name in (("b", "backbone.pth"), ("c", "checkpoint.pt")):
        (tmp_path / "fm" / key).mkdir(parents=True)
        (tmp_path / "fm" / key / name).write_bytes(b"x")
    w = layout.assign_weights(res, runs)
    assert w["b"].dir == f"{res}/fm/b" and w["b"].runs == ("b",) and w["b"].backbone == f"{res}/fm/b/backbone.pth"
    assert w["c"].dir == f"{res}/fm/c"
    assert w["a"].dir == f"{res}/fm/weights/k1" and w["a"].runs == ("a",)


# Reading identity out of a path: a folder's name (`.parent.name`, `.parent.parent`), its pieces (`.parts[i]`),
# a seed folder pattern. (Paths are built from identity by barlow.layout; identity is read from the files.)
def _path_parsing(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            inner = node.value
            if node.attr in ("name", "parent", "stem") and isinstance(inner, ast.Attribute) and inner.attr == "parent":
                found.append(f"line {node.lineno}: .parent.{node.attr}")
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "parts":
            found.append(f"line {node.lineno}: .parts[...]")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "seed(\\d" in node.value:
            found.append(f"line {node.lineno}: a seed-folder pattern")
    return found


def test_no_module_parses_identity_out_of_a_path():
    offenders = {}
    for folder in ("barlow", "benchmarks"):
        for f in sorted((REPO / folder).rglob("*.py")):
            hits = _path_parsing(ast.parse(f.read_text()))
            if hits:
                offenders[str(f.relative_to(REPO))] = hits
    assert not offenders, offenders


def test_the_scan_finds_what_the_earlier_report_did():
    earlier = ("m = SEED_DIR.fullmatch(path.parent.name)\n"
               "d, e = path.parent.parent.parent.name, path.parent.parent.name\nrel.parts[0]\n"
               "SEED_DIR = re.compile(r'seed(\\d+)')\n")
    assert len(_path_parsing(ast.parse(earlier))) >= 4
