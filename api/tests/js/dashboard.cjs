// Browser test of the dashboard in headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core):
//   node dashboard.cjs DASHBOARD_URL SCREENSHOT_PATH
// Opens the dashboard of a running `ledger demo`, sees prices update and the equity chart drawn from the
// `performance` query, places a market order, sees it fill and the position appear, and saves a screenshot.
// Exits 0 on success; prints the failing step and exits 1.
const { chromium } = require('playwright-core');

const [url, screenshot] = process.argv.slice(2);
// A bound that only turns a hang into a failure (generous: the machine may be slow and busy).
const STEP_MS = 180000;

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.LEDGER_CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
  let step = 'open the dashboard';
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  const problems = [];
  page.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
  try {
    await page.goto(url, { timeout: STEP_MS });

    step = 'see a live price';
    await page.waitForFunction(() => document.querySelector('#last-price').textContent !== '–', null, { timeout: STEP_MS });
    const first = await page.textContent('#last-price');
    step = `see the price move from ${first}`;
    await page.waitForFunction((before) => document.querySelector('#last-price').textContent !== before, first, { timeout: STEP_MS });

    step = 'see the subscriptions connected';
    await page.waitForSelector('#connection.live', { timeout: STEP_MS });

    step = 'see the portfolio selected';
    await page.waitForFunction(() => document.querySelector('#portfolio').value !== '' && !document.querySelector('#order-submit').disabled, null, { timeout: STEP_MS });

    step = 'see the equity chart drawn from the performance query';
    await page.waitForFunction(() => Number(document.querySelector('#equity-chart').dataset.performancePoints || 0) > 0, null, { timeout: STEP_MS });

    step = 'place a market order';
    await page.waitForFunction(() => [...document.querySelectorAll('#order-symbol option')].some((o) => o.value === 'GLOBEX'), null, { timeout: STEP_MS });
    await page.selectOption('#order-symbol', 'GLOBEX');
    await page.selectOption('#order-side', 'BUY');
    await page.selectOption('#order-type', 'MARKET');
    await page.fill('#order-quantity', '7');
    await page.click('#order-submit');
    await page.waitForFunction(() => /^order [0-9a-f]{8}: /.test(document.querySelector('#order-result').textContent), null, { timeout: STEP_MS });

    step = 'see the order fill';
    await page.waitForFunction(() => [...document.querySelectorAll('#orders tbody tr')].some(
      (row) => row.cells[1].textContent === 'GLOBEX' && row.cells[8].textContent === 'FILLED'), null, { timeout: STEP_MS });

    step = 'see the position appear';
    await page.waitForFunction(() => {
      const row = document.querySelector('#positions tbody tr[data-symbol="GLOBEX"]');
      return row && Number(row.cells[1].textContent.replace(/,/g, '')) >= 7;
    }, null, { timeout: STEP_MS });

    step = 'see the equity';
    await page.waitForFunction(() => document.querySelector('#equity').textContent !== '–', null, { timeout: STEP_MS });
    await page.screenshot({ path: screenshot, fullPage: true });
    if (problems.length) throw new Error(problems.join('; '));
    console.log(JSON.stringify({ ok: true, screenshot }));
    await browser.close();
  } catch (error) {
    try { await page.screenshot({ path: screenshot, fullPage: true }); } catch (_) {}
    console.log(JSON.stringify({ ok: false, step, error: String(error && error.message || error), problems }));
    await browser.close();
    process.exit(1);
  }
})();
