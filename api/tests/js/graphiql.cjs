// Browser test of GraphiQL in headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core):
//   node graphiql.cjs BASE_URL SCREENSHOT_PATH [TOKEN]
// Opens BASE_URL/graphql and sees the GraphiQL editor render from the vendored files alone: every request and
// WebSocket stays on BASE_URL's origin, the page's CSP reports no violation, and no script error happens. With a
// TOKEN (of a running `ledger demo`) it also pastes {"Authorization": "Bearer TOKEN"} into the headers editor,
// runs a query over POST /graphql and a subscription over /graphql/ws, and checks that the token was not written
// to localStorage/sessionStorage. Saves a screenshot. Exits 0 on success; prints the failing step and exits 1.
const { chromium } = require('playwright-core');

const [base, screenshot, token] = process.argv.slice(2);
// A bound that only turns a hang into a failure (generous: the machine may be slow and busy).
const STEP_MS = 180000;

(async () => {
  const origin = new URL(base).origin;
  const wsOrigin = origin.replace(/^http/, 'ws');
  const browser = await chromium.launch({
    executablePath: process.env.LEDGER_CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking'],
  });
  let step = 'open GraphiQL';
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  const problems = [];
  const requests = [];
  const elsewhere = [];
  const introspections = [];
  page.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
  page.on('request', (request) => {
    const url = request.url();
    requests.push(`${request.method()} ${url}`);
    if (new URL(url).origin !== origin && !url.startsWith('data:')) elsewhere.push(url);
  });
  page.on('websocket', (socket) => {
    requests.push(`WS ${socket.url()}`);
    if (new URL(socket.url()).origin !== wsOrigin) elsewhere.push(socket.url());
  });
  page.on('response', async (response) => {
    const request = response.request();
    if (request.method() === 'POST' && (request.postData() || '').includes('__schema')) {
      introspections.push({ status: response.status(), schema: (await response.text().catch(() => '')).includes('"__schema"') });
    }
  });
  page.on('console', (message) => {
    if (/Content Security Policy/i.test(message.text())) problems.push(`CSP: ${message.text()}`);
  });
  await page.addInitScript(() => {
    document.addEventListener('securitypolicyviolation', (e) => {
      console.error(`Content Security Policy violation: ${e.violatedDirective} ${e.blockedURI}`);
    });
  });
  const editor = (selector) => `${selector} .graphiql-editor:not(.hidden) .CodeMirror`;
  const QUERY = editor('.graphiql-query-editor');
  const HEADERS = editor('.graphiql-editor-tool[aria-label="Headers"]');
  // Sets an editor's text, then gives GraphiQL time to re-parse it (it tells subscriptions from queries by the
  // parsed document, which it updates a moment after an edit; a click at once would send the previous one).
  const setEditor = async (selector, text) => {
    await page.evaluate(([s, t]) => document.querySelector(s).CodeMirror.setValue(t), [selector, text]);
    await page.waitForTimeout(1000);
  };
  const result = () => page.evaluate(() => document.querySelector('.result-window .CodeMirror').CodeMirror.getValue());
  // Waits until the result editor's text matches `pattern` (a RegExp source; no eval in the page: its CSP forbids it).
  const waitResult = (pattern) => page.waitForFunction((source) => {
    const cm = document.querySelector('.result-window .CodeMirror');
    return cm && new RegExp(source).test(cm.CodeMirror.getValue());
  }, pattern, { timeout: STEP_MS, polling: 100 });
  try {
    await page.goto(`${base}/graphql`, { timeout: STEP_MS });

    step = 'see the GraphiQL editor';
    await page.waitForSelector('.graphiql-container', { timeout: STEP_MS });
    await page.waitForSelector(QUERY, { timeout: STEP_MS });
    await page.waitForSelector('.graphiql-execute-button', { timeout: STEP_MS });

    if (token) {
      step = 'load the schema (introspection over POST /graphql)';
      const deadline = Date.now() + STEP_MS;
      while (!introspections.some((i) => i.status === 200 && i.schema) && Date.now() < deadline) await page.waitForTimeout(100);
      if (!introspections.some((i) => i.status === 200 && i.schema)) throw new Error(`introspection: ${JSON.stringify(introspections)}`);

      step = 'paste the token into the headers editor';
      await page.waitForSelector(HEADERS, { timeout: STEP_MS });
      await setEditor(HEADERS, JSON.stringify({ Authorization: `Bearer ${token}` }, null, 2));

      step = 'run a query with the token';
      await setEditor(QUERY, '{ myPortfolios { id } }');
      await page.click('.graphiql-execute-button');
      await waitResult('myPortfolios|errors');
      const answer = JSON.parse(await result());
      if (answer.errors || !Array.isArray(answer.data && answer.data.myPortfolios)) throw new Error(`answer: ${JSON.stringify(answer)}`);

      step = 'run a subscription over /graphql/ws with the token';
      await setEditor(QUERY, 'subscription { priceTicks { symbol price } }');
      await page.click('.graphiql-execute-button');
      await waitResult('priceTicks|rror');
      const tick = await result();
      if (!/"priceTicks"\s*:\s*\{/.test(tick)) throw new Error(`subscription: ${tick}`);
      if (!requests.some((r) => r.startsWith(`WS ${wsOrigin}/graphql/ws`))) throw new Error(`no WebSocket to /graphql/ws: ${requests.join(', ')}`);
      await page.click('.graphiql-execute-button'); // stop it

      step = 'see that the token was not stored';
      const stored = await page.evaluate(() => JSON.stringify([{ ...localStorage }, { ...sessionStorage }]));
      if (stored.includes(token)) throw new Error(`the token is in web storage: ${stored.slice(0, 400)}`);
    }

    step = 'see every request stay on the server';
    await page.screenshot({ path: screenshot, fullPage: true });
    if (elsewhere.length) throw new Error(`requests to other origins: ${elsewhere.join(', ')}`);
    if (problems.length) throw new Error(problems.join('; '));
    console.log(JSON.stringify({ ok: true, screenshot, requests }));
    await browser.close();
  } catch (error) {
    try { await page.screenshot({ path: screenshot, fullPage: true }); } catch (_) {}
    console.log(JSON.stringify({ ok: false, step, error: String(error && error.message || error), problems, elsewhere, requests }));
    await browser.close();
    process.exit(1);
  }
})();
