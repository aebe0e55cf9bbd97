"""Render a workflow's rule graph to SVG and PNG, with the Mermaid the web view vendors, in
Debian's headless Chromium (Playwright; it downloads no browser).

    python docs/render_graph.py examples/plan_review.py:PlanReview docs/plan-review-graph

writes ``<out>.mmd`` (what ``python -m reactive graph`` prints), ``<out>.svg`` and
``<out>.png`` (the diagram on white, at device scale factor 2).
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

from reactive.cli.loading import load_targets
from reactive.graph import mermaid

ROOT = Path(__file__).resolve().parents[1]
MERMAID = ROOT / "reactive" / "ui" / "static" / "vendor" / "mermaid.min.js"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RENDER = """async (src) => {
  // HTML labels (the default): without them Mermaid 11 drops the '>' of "iteration > 3".
  mermaid.initialize({startOnLoad: false, theme: 'default', securityLevel: 'strict',
                      handDrawnSeed: 1});
  const {svg} = await mermaid.render('graph', src);
  const out = document.getElementById('out');
  out.innerHTML = svg;
  const el = out.querySelector('svg');  // at its natural size, not width=100%
  el.style.width = el.viewBox.baseVal.width + 'px';
  el.style.height = el.viewBox.baseVal.height + 'px';
  return svg;
}"""


def main() -> None:
    target, out = sys.argv[1], Path(sys.argv[2])
    (workflow,) = load_targets([target])
    source = mermaid(workflow)
    out.with_suffix(".mmd").write_text(source)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        try:
            page = browser.new_page(device_scale_factor=2, viewport={"width": 2400, "height": 1600})
            page.set_content(
                '<!doctype html><html><head><meta charset="utf-8"><style>html,body{margin:0;'
                "background:#fff}#out{display:inline-block;padding:16px;background:#fff}"
                '</style></head><body><div id="out"></div></body></html>'
            )
            page.add_script_tag(content=MERMAID.read_text())
            svg = page.evaluate(RENDER, source)
            out.with_suffix(".svg").write_text(svg)
            page.locator("#out").screenshot(path=str(out.with_suffix(".png")))
        finally:
            browser.close()


if __name__ == "__main__":
    main()
