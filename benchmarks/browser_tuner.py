"""The tuner in a real browser: JupyterLab in headless Chromium runs notebook 03 at its stored (smoke)
parameters, then moves the controls as a person would and measures what they see.

    python benchmarks/browser_tuner.py [--chromium /usr/bin/chromium] [--out /tmp/browser-tuner]

Needs Chromium (Debian: ``apt install chromium``) and Playwright's Python client (``pip install
playwright``; its own browser download is not used): neither is a dependency of the project. The
notebook runs in this checkout, from a copy (``notebooks/zz_browser_check_03.ipynb``, saved with its
outputs before the reload, removed afterwards; autosave is off); a notebook run by hand writes
``reports/interactive/``, never the committed ``reports/`` (checked here).

Prints one JSON line per check and writes screenshots to OUT:
- ``notebook``: seconds until the tuner shows and until the kernel is idle; the progress bars drawn
  and those left short of their total;
- ``controls``: each slider's track width (px) at 1100 px with the file browser open, and at 1000 px;
  the module toggles' state; whether the heads slider is disabled and the reason shown;
- ``debounce``: five arrow presses on τ within half a second; how many previews ran (distinct τ the
  status table showed) and the seconds until it settled;
- ``toggle``: the gate toggle's look before and after a click;
- ``reload``: after saving the notebook with its outputs and reloading the page, how many outputs and
  tuner sliders show, and how many "Error displaying widget" messages;
- ``reports``: whether notebook 03's committed outputs changed, and that ``reports/interactive/`` was written.
"""

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "notebooks/03_tune_neutralization.ipynb"
COPY = "notebooks/zz_browser_check_03.ipynb"  # what the browser runs and saves (removed afterwards)
COMMITTED = ("reports/metrics/03_tuning.json", "reports/tables/table03_tau_strength.md",
             "reports/figures/fig03_tau_strength.png")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(port: int, token: str, settings: Path, log) -> subprocess.Popen:
    plugin = settings / "@jupyterlab" / "docmanager-extension"
    plugin.mkdir(parents=True)
    (plugin / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings))
    lab = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
                            "--ServerApp.ip=127.0.0.1", "--KernelManager.transport=ipc", f"--IdentityProvider.token={token}",
                            f"--ServerApp.root_dir={ROOT}",
                            f"--LabApp.workspaces_dir={settings.parent / 'workspaces'}"]
                           + (["--allow-root"] if os.geteuid() == 0 else []), stdout=log, stderr=subprocess.STDOUT, env=env)
    for _ in range(120):
        if lab.poll() is not None:
            raise SystemExit(f"JupyterLab exited with status {lab.returncode} (see its log)")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
            return lab
        except OSError:
            time.sleep(1)
    lab.kill()
    raise SystemExit("JupyterLab did not start within 2 minutes (see its log)")


def report(**row) -> None:
    print(json.dumps(row), flush=True)


def slider_widths(page) -> list[dict]:
    return page.eval_on_selector_all(".jp-OutputArea .widget-slider", """els => els.map(e => ({
        label: (e.querySelector('.widget-label') || {}).textContent || '',
        track: Math.round((e.querySelector('.slider-container') || e).getBoundingClientRect().width),
        disabled: !!e.querySelector('[disabled]') || e.classList.contains('mod-disabled')}))""")


def toggles(page) -> list[dict]:
    return page.eval_on_selector_all(".jp-OutputArea .widget-toggle-button", """els => els.map(e => ({
        label: e.textContent.trim(), pressed: e.classList.contains('mod-active'),
        success: e.classList.contains('mod-success'), icon: (e.querySelector('i') || {}).className || ''}))""")


def unfinished_bars(page) -> list[str]:
    """The visible progress bars whose count stopped short (``n/m`` with ``n < m``)."""
    import re

    out = []
    for bar in page.locator(".jp-OutputArea .widget-hbox:has(.widget-hprogress)").all():
        if bar.is_visible():
            text = " ".join(bar.inner_text().split())
            m = re.search(r"(\d+)/(\d+)", text)
            if m and int(m.group(1)) < int(m.group(2)):
                out.append(text)
    return out


def status_tau(page):
    """The τ of the tuner's "now" row, or None while it is not shown."""
    area = page.locator(".jp-OutputArea-output:has(.widget-slider)")
    text = area.first.inner_text() if area.count() else ""
    for line in text.splitlines():
        if "now (τ" in line:
            return line.split("now (τ", 1)[1].split(")", 1)[0].strip()
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "browser-tuner"))
    p.add_argument("--timeout", type=float, default=900, help="seconds for the notebook to reach the tuner")
    a = p.parse_args()
    from playwright.sync_api import sync_playwright

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    before = {f: (ROOT / f).read_bytes() if (ROOT / f).exists() else None for f in COMMITTED}
    notebook_before = (ROOT / NOTEBOOK).read_bytes()
    port, token = free_port(), secrets.token_hex(16)
    if (ROOT / COPY).exists():
        raise SystemExit(f"{COPY} exists: remove it (a browser check left it?) and run again")
    (ROOT / COPY).write_bytes(notebook_before)
    with tempfile.TemporaryDirectory() as tmp, open(out / "jupyterlab.log", "w") as log:
        lab = start_lab(port, token, Path(tmp) / "settings", log)
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=a.chromium, args=FLAGS,
                                             env=dict(os.environ, HOME=tmp))
                page = browser.new_page(viewport={"width": 1100, "height": 900})
                try:
                    checks(page, port, token, out, a.timeout)
                except Exception:
                    page.screenshot(path=str(out / "failure.png"))
                    raise
                browser.close()
        finally:
            lab.terminate()
            lab.wait(timeout=30)
            (ROOT / COPY).unlink(missing_ok=True)
    changed = [f for f, b in before.items() if ((ROOT / f).read_bytes() if (ROOT / f).exists() else None) != b]
    report(check="reports", committed_changed=changed, notebook_changed=(ROOT / NOTEBOOK).read_bytes() != notebook_before,
           interactive=sorted(str(q.relative_to(ROOT)) for q in (ROOT / "reports" / "interactive").rglob("*03*"))[:6])


def checks(page, port: int, token: str, out: Path, timeout: float) -> None:
    url = f"http://127.0.0.1:{port}/lab/tree/{COPY}?token={token}"
    page.goto(url)
    page.wait_for_selector(".jp-Notebook", timeout=120_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator, .jp-KernelStatus", timeout=120_000)
    try:  # JupyterLab may ask which kernel to start
        page.click(".jp-Dialog .jp-mod-accept", timeout=10_000)
    except Exception:
        pass
    if not page.is_visible(".jp-FileBrowser"):
        page.click(".jp-SideBar [data-id='filebrowser']")
    page.click(".lm-MenuBar-itemLabel:text-is('Run')")
    page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
    t0 = time.time()
    page.wait_for_selector(".jp-OutputArea .widget-slider", timeout=timeout * 1000)
    while status_tau(page) is None and time.time() - t0 < timeout:
        time.sleep(0.5)
    report(check="notebook", seconds_to_tuner=round(time.time() - t0, 1), tau=status_tau(page))
    # the cells after the tuner run first: widget messages wait for an idle kernel
    page.wait_for_selector(".jp-StatusBar-TextItem:text-matches('Idle')", timeout=timeout * 1000)
    report(check="notebook", seconds_to_idle=round(time.time() - t0, 1),
           bars=page.locator(".jp-OutputArea .widget-hprogress").count(), unfinished_bars=unfinished_bars(page))
    news = page.get_by_role("button", name="No", exact=True)
    if news.count():  # JupyterLab's "notified about Jupyter news?" toast covers the samples
        news.first.click()
    tuner = page.locator(".jp-OutputArea .widget-vbox").first
    tuner.scroll_into_view_if_needed()
    page.screenshot(path=str(out / "tuner_1100_filebrowser.png"))
    why = page.locator(".jp-OutputArea .widget-html", has_text="heads: disabled")
    report(check="controls", width=1100, file_browser=page.is_visible(".jp-FileBrowser"),
           sliders=slider_widths(page), toggles=toggles(page),
           heads_reason=why.first.inner_text() if why.count() else "")

    handle = page.locator(".jp-OutputArea .widget-slider .noUi-handle").first
    start = status_tau(page)
    handle.focus()
    seen, t1 = [], time.time()
    for _ in range(5):
        page.keyboard.press("ArrowRight")
        time.sleep(0.08)
    last, changed = start, t1
    while time.time() - t1 < 120 and (last == start or time.time() - changed < 4):  # 4 s of quiet after a change
        now = status_tau(page)
        busy = page.locator(".jp-OutputArea .widget-html", has_text="previewing ...").count()
        if now is not None and now != last and not busy:
            seen.append(now)
            last, changed = now, time.time()
        time.sleep(0.05)
    report(check="debounce", presses=5, start_tau=start, shown=seen, previews=len(seen),
           settled_s=round(changed - t1, 2))
    page.screenshot(path=str(out / "tuner_after_arrows.png"))

    gate = page.locator(".jp-OutputArea .widget-toggle-button", has_text="gate").first
    look = toggles(page)
    gate.click()
    time.sleep(1.5)
    report(check="toggle", before=[t for t in look if t["label"] == "gate"],
           after=[t for t in toggles(page) if t["label"] == "gate"])

    page.set_viewport_size({"width": 1000, "height": 900})
    time.sleep(1)
    tuner.scroll_into_view_if_needed()
    page.screenshot(path=str(out / "tuner_1000.png"))
    report(check="controls", width=1000, file_browser=page.is_visible(".jp-FileBrowser"),
           sliders=slider_widths(page))

    page.keyboard.press("Control+s")  # saved with its outputs (the copy), then the page reloaded
    time.sleep(3)
    page.reload()
    page.wait_for_selector(".jp-Notebook", timeout=120_000)
    page.wait_for_selector(".jp-OutputArea-output", timeout=120_000)
    time.sleep(10)
    text = page.inner_text(".jp-Notebook")
    page.screenshot(path=str(out / "after_reload.png"), full_page=True)
    report(check="reload", outputs=page.locator(".jp-OutputArea-output").count(),
           widget_errors=text.count("Error displaying widget"), model_not_found=text.count("model not found"),
           tuner_sliders=page.locator(".jp-OutputArea .widget-slider").count(), unfinished_bars=unfinished_bars(page))


if __name__ == "__main__":
    main()
