"""Named variants of a run, as ``compare.variants`` and the study name them:
``METHOD[+edit][@official]``.

* ``METHOD``: ``aggregation.method`` (its options as configured when it is the configured method,
  else its defaults), client editing off;
* ``+edit``: client editing on (where the method allows it);
* ``@official``: every behaviour of the official FediLoRA code (docs/method.md): the method's
  ``official`` options (zeroed unowned dimensions, each client's own fresh LoRA in round 1, and
  the method's own ones), ``lora_alpha`` 32 for every rank, and placeholder inputs for a missing
  modality.
"""

from __future__ import annotations

import re

from fedilora import methods
from fedilora.config import Params, parse_params

PATTERN = re.compile(r"(?P<method>[A-Za-z0-9_]+)(?P<edit>\+edit)?(?P<official>@official)?")
OFFICIAL_RUN = {"lora": {"alpha_mode": "fixed", "alpha": 32.0}, "missing": {"fill": "placeholder"}}


def parse(name: str) -> tuple[str, bool, bool]:
    """(method, editing, official) of a variant name; a malformed one is named."""
    match = PATTERN.fullmatch(name)
    if not match:
        raise ValueError(f"variant {name!r} is not METHOD, METHOD+edit, METHOD@official or METHOD+edit@official")
    return match["method"], bool(match["edit"]), bool(match["official"])


def resolve(params: Params, name: str) -> Params:
    """``params`` for one variant."""
    method, edit, official = parse(name)
    data = params.model_dump(mode="json")
    options = params.aggregation.options if method == params.aggregation.method else {}
    if official:
        options = {**methods.method_class(method).official}
        for section, values in OFFICIAL_RUN.items():
            data[section].update(values)
    data["aggregation"] = {"method": method, "options": options}
    data["editing"]["enabled"] = edit
    return parse_params(data, f"variant {name}")
