"""Regenerate docs/prefect-ui.png and docs/mlflow-ui.png from the default run, on real local servers.

    apt-get install -y chromium            # Debian's Chromium, once
    make run                               # the default pipeline: its compare is what MLflow shows
    .venv/bin/python docs/screenshots.py   # a few minutes on 2 cores

What it does (``--workdir`` keeps its temporary folder):

1. starts ``prefect server start`` on 127.0.0.1 with its own PREFECT_HOME, then ``fedilora serve``
   in the repository (the default params), triggers a run of ``federated_training/fedilora``
   through the REST API with parameters (what the UI's "Run > Custom run" form does: 2 rounds, to
   keep it short), waits for COMPLETED, and screenshots that flow run's page -> docs/prefect-ui.png;
2. starts ``mlflow server`` on the repository's store (``mlruns/``) and screenshots MLflow's
   "Compare runs" page for the latest ``compare`` run's variant runs: each variant's mean over
   ``compare.seeds`` and its 95 % CI per summary, the seeds' runs nested under it ->
   docs/mlflow-ui.png.

Chromium is driven headless over the DevTools protocol (``websockets``, already a Prefect
dependency) rather than with ``--screenshot``, because the MLflow UI needs a setting in
localStorage before it renders the page we want (its assistant side panel closed), and a
screenshot is only worth taking once the page shows its data. Servers and the browser's
DevTools endpoint bind to 127.0.0.1 only, and all of them are stopped at the end.

A plain ``chromium --headless ... --screenshot=FILE --virtual-time-budget=15000 URL`` works for
the Prefect page alone (see docs/ui.md).
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from websockets.sync.client import connect

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_servers import (  # noqa: E402  (helpers shared with the server tests)
    BIN, HOST, Server, find_deployment, free_port, prefect_env, start_mlflow_server,
    start_prefect_server, trigger_run, wait_final_state, wait_until,
)

WIDTH, HEIGHT = 1400, 900
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    f"--window-size={WIDTH},{HEIGHT}", "--hide-scrollbars", "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]


class Browser:
    """Headless Chromium with a fresh profile, driven over the DevTools protocol."""

    def __init__(self, chromium: str = "chromium") -> None:
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        self.proc = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        port_file = Path(self.profile) / "DevToolsActivePort"
        wait_until(lambda: port_file.is_file() and len(port_file.read_text().split()) == 2, 60, "Chromium DevTools")
        port = port_file.read_text().split()[0]
        targets = requests.get(f"http://{HOST}:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self._ids = itertools.count(1)
        self.cmd("Page.enable")
        self.cmd("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)

    def cmd(self, method: str, **params) -> dict:
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=120))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expression: str):
        result = self.cmd("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    def open(self, url: str, *, reload: bool = False, settle: float = 8.0) -> None:
        self.cmd("Page.navigate", url=url)
        if reload:  # a hash-only change keeps the single-page app (and what it read from localStorage)
            time.sleep(1)
            self.cmd("Page.reload", ignoreCache=True)
        time.sleep(settle)

    def wait_text(self, text: str, timeout: float = 60) -> None:
        wait_until(lambda: self.js(f"document.body && document.body.innerText.includes({json.dumps(text)})"),
                   timeout, f"{text!r} on the page")

    def screenshot(self, path: Path) -> None:
        data = self.cmd("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        print(f"  {path} ({path.stat().st_size // 1024} KB)")

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)


def prefect_screenshot(project: Path, work: Path, browser: Browser, out: Path) -> None:
    port = free_port()
    home = work / "prefect-home"
    servers: list[Server] = []
    try:
        print(f"prefect server on http://{HOST}:{port}")
        servers.append(start_prefect_server(home, port))
        env = prefect_env(home, port)
        env["PREFECT_LOGGING_LEVEL"] = "INFO"  # the flow run's logs show in the UI (fedilora's default: WARNING)
        servers.append(Server([str(BIN / "fedilora"), "serve", "--params", "params.yaml"],
                              cwd=project, env=env, log=work / "serve.log"))
        deployment = wait_until(lambda: find_deployment(port), 120, "the deployment", servers=tuple(servers))
        # what "Run > Custom run" in the UI sends: the deployment's params_path plus these overrides
        # (its outputs and MLflow run go aside, so the pipeline's outputs and experiment stay as they are)
        overrides = {"aggregation.method": "hetlora", "federation.rounds": 2, "tracking.experiment": "fedilora-screenshots"}
        run = trigger_run(port, deployment["id"], {"overrides": overrides, "out_dir": str(work / "federate")})
        final = wait_final_state(port, run["id"], 180, servers=tuple(servers))
        if final["state_type"] != "COMPLETED":
            raise RuntimeError(f"flow run ended {final['state_name']}:\n{servers[-1].tail()}")
        browser.open(f"http://{HOST}:{port}/runs/flow-run/{run['id']}")
        browser.wait_text("Completed")
        time.sleep(3)  # the timeline graph animates in
        browser.screenshot(out)
    finally:
        for server in reversed(servers):
            server.stop()


def mlflow_screenshot(project: Path, work: Path, browser: Browser, out: Path) -> None:
    port = free_port()
    print(f"mlflow server on http://{HOST}:{port}")
    server = start_mlflow_server(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}", port, work / "mlflow-server")
    try:
        api = f"http://{HOST}:{port}/api/2.0/mlflow"
        exp = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "fedilora"}, timeout=10)
        exp_id = exp.json()["experiment"]["experiment_id"]
        search = {"experiment_ids": [exp_id], "filter": "attributes.run_name = 'compare'",
                  "order_by": ["attributes.start_time DESC"]}
        parent = requests.post(f"{api}/runs/search", json=search, timeout=10).json()["runs"][0]["info"]["run_id"]
        search = {"experiment_ids": [exp_id], "filter": f"tags.mlflow.parentRunId = '{parent}'",
                  "order_by": ["attributes.start_time ASC"]}
        found = requests.post(f"{api}/runs/search", json=search, timeout=10).json()["runs"]
        children = [r["info"]["run_id"] for r in found]  # the variant runs (their seeds' runs are nested below them)
        assert children, f"no variant runs under the compare run {parent}; run `make run` first"
        base = f"http://{HOST}:{port}"
        browser.open(f"{base}/#/experiments")
        # close the "MLflow Assistant" side panel, which opens itself on a first visit to a local server
        browser.js("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                   "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');")
        # what the runs table's "Compare" button opens for the selected sibling runs
        runs_json = json.dumps(children).replace(" ", "")
        browser.open(f"{base}/#/compare-runs?runs={runs_json}&experiments=[\"{exp_id}\"]&workflowType=machine_learning",
                     reload=True)
        browser.wait_text(f"Comparing {len(children)} Runs")
        time.sleep(3)  # the parallel-coordinates plot draws last
        browser.screenshot(out)
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, help="keep the project and server logs here (default: a temp dir)")
    p.add_argument("--out", type=Path, default=REPO / "docs")
    p.add_argument("--only", choices=("prefect", "mlflow"))
    p.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = p.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="fedilora-screens-"))
    work.mkdir(parents=True, exist_ok=True)
    project = REPO

    browser = Browser(args.chromium)
    try:
        if args.only in (None, "prefect"):
            prefect_screenshot(project, work, browser, args.out / "prefect-ui.png")
        if args.only in (None, "mlflow"):
            mlflow_screenshot(project, work, browser, args.out / "mlflow-ui.png")
    finally:
        browser.close()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
