// Render a Mermaid file to SVG + PNG with the real Mermaid library in Debian's headless Chromium.
// Needs: apt-get install chromium; npm install mermaid playwright-core (run node from that directory).
// Usage: node render-mermaid.mjs input.mmd out.svg out.png
import { chromium } from 'playwright-core';
import { readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
const require = createRequire(import.meta.url);
const [,, input, outSvg, outPng] = process.argv;
const source = readFileSync(input, 'utf8');
const mermaidJs = readFileSync(require.resolve('mermaid/dist/mermaid.min.js'), 'utf8');
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  const page = await browser.newPage({ deviceScaleFactor: 2, viewport: { width: 2400, height: 1600 } });
  page.on('console', (m) => console.error('[page]', m.text()));
  await page.setContent('<!doctype html><html><head><meta charset="utf-8"><style>'
    + 'html,body{margin:0;background:#fff}#out{display:inline-block;padding:16px;background:#fff}</style>'
    + '</head><body><div id="out"></div></body></html>');
  await page.addScriptTag({ content: mermaidJs });
  const svg = await page.evaluate(async (src) => {
    // Default (HTML) labels: with htmlLabels off, Mermaid 11 drops the '>' of "iteration > 3"
    // and draws edges over label text.
    // handDrawnSeed: fixed seed for the shapes' path jitter, so re-renders are byte-identical.
    mermaid.initialize({ startOnLoad: false, theme: 'default', securityLevel: 'strict', handDrawnSeed: 1 });
    const { svg } = await mermaid.render('plan-review-graph', src);
    const out = document.getElementById('out');
    out.innerHTML = svg;
    // Mermaid emits width="100%" + max-width; show it at its natural size for the screenshot.
    const el = out.querySelector('svg');
    el.style.width = el.viewBox.baseVal.width + 'px';
    el.style.height = el.viewBox.baseVal.height + 'px';
    return svg;
  }, source);
  writeFileSync(outSvg, svg);
  const box = await page.locator('#out svg').boundingBox();
  console.error(`rendered size: ${Math.round(box.width)}x${Math.round(box.height)} CSS px`);
  await page.locator('#out').screenshot({ path: outPng, omitBackground: false });
} finally {
  await browser.close();
}
