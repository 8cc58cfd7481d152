"""Write docs/configuration.md from the config dataclasses (field, default, docstring).

python scripts/gen_config_docs.py          # rewrite the page
python scripts/gen_config_docs.py --check  # exit 1 if the page is stale (run by the tests)
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
from pathlib import Path

from dcmdp import config

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configuration.md"

HEADER = """# Configuration

`dcmdp train` reads the defaults below, then `--config FILE.yaml`, then `section.field=value`
overrides (values parsed as YAML: `multiplier.tolerance=null`, `optim.betas=[0.9,0.95]`,
`task.options.digits=3`). A bad field or value stops the run with a message naming the field and
the allowed values. Each run writes its resolved config to `RUN_DIR/config.yaml`; `dcmdp train
--print-config [overrides]` prints it without running. Examples for each engine and loss are in
`configs/`.

`multiplier.tolerance=null` means an **automatic** c: the first `multiplier.auto_warmup_steps`
steps measure D without acting on it (the progress line shows "c auto (measured k/n warm-up
steps)"), then c is set to `auto_quantile` of those D's times `auto_multiple`.

`dcmdp train --resume run.out_dir=DIR` continues the run in DIR **with the config saved in
DIR/config.yaml**; `--config` and overrides apply on top and each change is printed. Only
`run.steps` (to extend a run), `run.out_dir` and the run's reporting settings (`run.eval_*`,
`run.checkpoint_every`, `run.keep_checkpoints`, `run.tensorboard`, `run.wandb*`, `run.threads`,
`run.rollout_timeout_s`), `model.device`, `engine.kv_cache_gb`, the weight-sync check
(`engine.sync_check_*`) and the permission `loss.allow_failed_composition` may change; anything else would make it another experiment and is
refused (exit 2), with a hint to start a new run from the checkpoint. That includes the
`multiplier` section for a loss without a constraint, whose checkpoint still holds the
multiplier's state. Resuming a finished run says so and exits without loading anything. From
Python, `dcmdp.trainer.train(cfg, resume=True)` applies the same rule to the `cfg` it is given
against the saved config.yaml (a `ConfigError` names what would change). A resume takes the
newest complete checkpoint (a folder `checkpoints/step_N`; one renamed to anything else is not
taken). If one of its files was damaged after it was written (a truncated `trainer_state.pt` or
weights file, weights holding a NaN), the resume stops there (exit 2, config.yaml untouched) and
names the checkpoint it would take once that folder is moved out of `checkpoints/`. A run whose
log reached its last step but whose checkpoints folder holds none is not called finished (its
final weights are gone): exit 2, with the ways out.

This page is generated from `src/dcmdp/config.py` (the `multiplier` section from
`src/dcmdp/algo/multiplier.py`, where the multiplier's settings are defined once) by
`scripts/gen_config_docs.py`.
"""


def field_docs(cls: type) -> dict[str, str]:
    """Field -> docstring, read from the source file that defines ``cls``."""
    tree = ast.parse(Path(inspect.getsourcefile(cls) or config.__file__).read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    docs: dict[str, str] = {}
    body = node.body
    for i, stmt in enumerate(body):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            nxt = body[i + 1] if i + 1 < len(body) else None
            if (
                isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def render() -> str:
    out = [HEADER]
    for section, cls in config.SECTIONS.items():
        out.append(f"\n## `{section}`\n\n| field | default | meaning |\n|---|---|---|")
        docs = field_docs(cls)
        instance = cls()
        for f in dataclasses.fields(cls):
            default = getattr(instance, f.name)
            shown = "null" if default is None else repr(default)
            meaning = docs.get(f.name, "").replace("|", "\\|")  # a pipe would split the table row
            out.append(f"| `{section}.{f.name}` | `{shown}` | {meaning} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if PAGE.exists() and PAGE.read_text() == text else 1)
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
