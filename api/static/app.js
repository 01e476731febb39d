// The ledger dashboard: plain JavaScript over the GraphQL API (queries and mutations over HTTP, live data over
// `graphql-transport-ws` with the graphql-ws client). The token comes from the URL fragment (#token=…, as
// `ledger demo` prints it) or from the login form, and is kept in localStorage.
"use strict";

const POINTS_MAX = 300;
const state = { token: null, portfolio: null, symbol: null, orders: new Map(), subscriptions: [], ws: null };
const $ = (id) => document.getElementById(id);

function readToken() {
  const match = location.hash.match(/token=([^&]+)/);
  if (match) {
    localStorage.setItem("ledger.token", decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname);
  }
  return localStorage.getItem("ledger.token");
}

async function gql(query, variables = {}) {
  const response = await fetch("/graphql", {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${state.token}` },
    body: JSON.stringify({ query, variables }),
  });
  const body = await response.json();
  if (body.errors && body.errors.length) {
    const error = new Error(body.errors[0].message);
    error.code = body.errors[0].extensions && body.errors[0].extensions.code;
    throw error;
  }
  return body.data;
}

// `positionOf(data)`, when given, names the log position a message reflects: it becomes the subscription's
// `after`, so that when the socket reconnects (graphql-ws sends the same payload object again) the
// subscription resumes where it stopped instead of skipping what happened meanwhile.
function subscribe(query, variables, onData, positionOf) {
  const payload = { query, variables: { ...variables } };
  const dispose = state.ws.subscribe(payload, {
    next: (message) => {
      if (!message.data) return;
      const position = positionOf && positionOf(message.data);
      if (position) payload.variables.after = position;
      onData(message.data);
    },
    error: (error) => setConnection("error", `subscription error: ${error.message || error}`),
    complete: () => {},
  });
  state.subscriptions.push(dispose);
}

function setConnection(kind, text) {
  const pill = $("connection");
  pill.className = `pill ${kind}`;
  pill.textContent = text;
}

const fmt = (value, digits = 2) => value === null || value === undefined ? "–"
  : Number(value).toLocaleString(undefined, { minimumFractionDigits: digits, maximumFractionDigits: digits });
const signed = (cell, value) => {
  cell.textContent = fmt(value);
  cell.className = value === null || value === undefined ? "" : Number(value) >= 0 ? "up" : "down";
};

function lineChart(canvas, label, color) {
  return new Chart(canvas, {
    type: "line",
    data: { datasets: [{ label, data: [], borderColor: color, borderWidth: 1.5, pointRadius: 0, tension: 0.1 }] },
    options: {
      animation: false, parsing: false, maintainAspectRatio: true,
      plugins: { legend: { display: false } },
      scales: {
        x: { type: "linear", ticks: { color: "#8b98a5", maxTicksLimit: 6, callback: (v) => new Date(v).toLocaleTimeString() } },
        y: { ticks: { color: "#8b98a5" } },
      },
    },
  });
}

// The equity chart: equity (left axis) and the time-weighted return in % (right axis) from the `performance`
// query on load, then equity as the portfolio changes live.
function equityLineChart(canvas) {
  const chart = lineChart(canvas, "equity", "#3fb950");
  chart.data.datasets.push({ label: "return %", data: [], borderColor: "#d29922", borderWidth: 1, pointRadius: 0,
    tension: 0.1, yAxisID: "returns" });
  chart.options.scales.returns = { position: "right", grid: { drawOnChartArea: false },
    ticks: { color: "#d29922", callback: (v) => `${v}%` } };
  chart.options.plugins.legend = { display: true, labels: { color: "#8b98a5", boxHeight: 2 } };
  chart.update("none");
  return chart;
}

// The portfolio's equity curve (a point a minute, the last ~8 hours) and its return since the curve's start.
// A portfolio the read model has not seen yet answers null: look again shortly.
async function loadPerformance(id) {
  const { performance } = await gql(`query($id: UUID!) { performance(portfolioId: $id, interval: MINUTE) {
    to timeWeightedReturn points { at equity cumulativeReturn } } }`, { id });
  if (state.portfolio !== id) return;
  if (!performance) {
    setTimeout(() => state.portfolio === id && loadPerformance(id).catch(() => {}), 2000);
    return;
  }
  const live = equityChart.data.datasets[0].data.filter((p) => p.x > Date.parse(performance.to));
  equityChart.data.datasets[0].data = performance.points.map((p) => ({ x: Date.parse(p.at), y: Number(p.equity) }))
    .concat(live);
  equityChart.data.datasets[1].data =
    performance.points.map((p) => ({ x: Date.parse(p.at), y: Number(p.cumulativeReturn) * 100 }));
  equityChart.update("none");
  $("equity-chart").dataset.performancePoints = String(performance.points.length);
  const twr = performance.timeWeightedReturn;
  $("equity-return").textContent = twr === null ? "" : `return ${fmt(Number(twr) * 100)} % (time-weighted)`;
}

function pushPoint(chart, x, y) {
  const data = chart.data.datasets[0].data;
  data.push({ x, y: Number(y) });
  if (data.length > POINTS_MAX) data.splice(0, data.length - POINTS_MAX);
  chart.update("none");
}

let priceChart, equityChart;

// ---- prices ----------------------------------------------------------------------------------------------

async function loadPrices() {
  const { prices } = await gql("{ prices { symbol price asOf } }");
  const symbols = prices.map((p) => p.symbol).sort();
  for (const select of [$("symbol"), $("order-symbol")]) {
    const current = select.value;
    select.innerHTML = symbols.map((s) => `<option>${s}</option>`).join("");
    if (current && symbols.includes(current)) select.value = current;
  }
  for (const p of prices) priceRow(p.symbol, p.price);
  if (!state.symbol && symbols.length) await selectSymbol(symbols[0]);
  return symbols.length;
}

function priceRow(symbol, price) {
  const body = $("prices").tBodies[0];
  let row = body.querySelector(`tr[data-symbol="${symbol}"]`);
  if (!row) {
    row = body.insertRow();
    row.dataset.symbol = symbol;
    row.insertCell().textContent = symbol;
    row.insertCell();
    [...body.rows].sort((a, b) => a.dataset.symbol.localeCompare(b.dataset.symbol)).forEach((r) => body.appendChild(r));
  }
  const cell = row.cells[1];
  const previous = Number(cell.dataset.price || price);
  cell.dataset.price = price;
  cell.textContent = fmt(price);
  cell.className = Number(price) >= previous ? "up" : "down";
}

async function selectSymbol(symbol) {
  state.symbol = symbol;
  $("symbol").value = symbol;
  const { priceHistory } = await gql(
    "query($s: String!) { priceHistory(symbol: $s, interval: TICK, limit: 300) { time close } }", { s: symbol });
  priceChart.data.datasets[0].label = symbol;
  priceChart.data.datasets[0].data = priceHistory.map((p) => ({ x: Date.parse(p.time), y: Number(p.close) }));
  priceChart.update("none");
  const last = priceHistory[priceHistory.length - 1];
  $("last-price").textContent = last ? fmt(last.close) : "–";
}

function onTick(tick) {
  priceRow(tick.symbol, tick.price);
  if (![...$("symbol").options].some((o) => o.value === tick.symbol)) loadPrices();
  if (tick.symbol === state.symbol) {
    $("last-price").textContent = fmt(tick.price);
    pushPoint(priceChart, Date.parse(tick.ts), tick.price);
  }
}

// ---- portfolio -------------------------------------------------------------------------------------------

const PORTFOLIO_FIELDS = `cash reserved buyingPower realizedPnl
  positions { symbol quantity averageCost realizedPnl }
  valuation { totalEquity marketValue unrealizedPnl stale missingReason
    positions { symbol lastPrice marketValue unrealizedPnl stale } }`;
const ORDER_FIELDS = "id symbol side type limitPrice quantity timeInForce status cumQuantity averagePrice placedAt lastPosition";

async function loadPortfolios() {
  const { myPortfolios } = await gql("{ myPortfolios { id owner openedAt } }");
  const select = $("portfolio");
  select.innerHTML = myPortfolios.map((p) => `<option value="${p.id}">${p.owner} · ${p.id.slice(0, 8)}</option>`).join("");
  if (!myPortfolios.length && !state.portfolio) {
    $("order-result").innerHTML = 'No portfolio yet. <button id="open-portfolio" class="small">Open one with 100,000 USD</button>';
    $("open-portfolio").onclick = openPortfolio;
    // A portfolio opened a moment ago reaches the read model shortly: look again.
    setTimeout(async () => {
      if (state.portfolio) return;
      const portfolios = await loadPortfolios().catch(() => []);
      if (portfolios.length && !state.portfolio) {
        if ($("open-portfolio")) $("order-result").textContent = "";
        await selectPortfolio(portfolios[0].id);
      }
    }, 2000);
  }
  return myPortfolios;
}

async function openPortfolio() {
  const key = crypto.randomUUID();
  const { openPortfolio } = await gql(
    'mutation($k: String!) { openPortfolio(input: { baseCurrency: "USD" }, idempotencyKey: $k) { aggregateId } }', { k: key });
  await gql("mutation($id: UUID!, $k: String!) { deposit(portfolioId: $id, amount: \"100000\", idempotencyKey: $k) { lastPosition } }",
    { id: openPortfolio.aggregateId, k: `${key}-deposit` });
  await loadPortfolios();
  await selectPortfolio(openPortfolio.aggregateId);
}

async function selectPortfolio(id) {
  state.portfolio = id;
  $("portfolio").value = id;
  $("order-submit").disabled = false;
  state.orders.clear();
  $("orders").tBodies[0].innerHTML = "";
  equityChart.data.datasets.forEach((d) => { d.data = []; });
  delete $("equity-chart").dataset.performancePoints;
  loadPerformance(id).catch((error) => { $("equity-return").textContent = `no performance: ${error.message}`; });
  const { portfolio } = await gql(`query($id: UUID!) { portfolio(id: $id) { ${PORTFOLIO_FIELDS}
    orders(first: 50) { edges { node { ${ORDER_FIELDS} } } } } }`, { id });
  if (!portfolio) return;
  showPortfolio(portfolio);
  portfolio.orders.edges.map((e) => e.node).reverse().forEach(showOrder);
  resubscribePortfolio();
}

function showPortfolio(p) {
  const v = p.valuation;
  $("equity").textContent = fmt(v.totalEquity);
  $("cash").textContent = fmt(p.cash);
  $("reserved").textContent = fmt(p.reserved);
  $("buying-power").textContent = fmt(p.buyingPower);
  signed($("unrealized"), v.unrealizedPnl);
  signed($("realized"), p.realizedPnl);
  $("valuation-note").textContent = v.missingReason ? `not valued: ${v.missingReason}` : v.stale ? "some prices are stale" : "";
  if (v.totalEquity !== null) pushPoint(equityChart, Date.now(), v.totalEquity);
  const valued = new Map(v.positions.map((x) => [x.symbol, x]));
  const body = $("positions").tBodies[0];
  body.innerHTML = "";
  for (const position of p.positions.filter((x) => Number(x.quantity) !== 0 || Number(x.realizedPnl) !== 0)) {
    const row = body.insertRow();
    row.dataset.symbol = position.symbol;
    const value = valued.get(position.symbol) || {};
    row.insertCell().textContent = position.symbol;
    row.insertCell().textContent = fmt(position.quantity, 0);
    row.insertCell().textContent = fmt(position.averageCost);
    row.insertCell().textContent = fmt(value.lastPrice);
    row.insertCell().textContent = fmt(value.marketValue);
    signed(row.insertCell(), value.unrealizedPnl);
    signed(row.insertCell(), position.realizedPnl);
  }
}

const OPEN_STATUSES = ["PENDING_NEW", "NEW", "PARTIALLY_FILLED"];

// Queries and subscription messages can arrive out of order: a row never goes back to an older log position.
function showOrder(order) {
  const known = state.orders.get(order.id) || {};
  if (known.lastPosition !== undefined && order.lastPosition !== undefined && order.lastPosition < known.lastPosition) {
    return;
  }
  const merged = { ...known, ...order };
  state.orders.set(order.id, merged);
  const body = $("orders").tBodies[0];
  let row = body.querySelector(`tr[data-order="${order.id}"]`);
  if (!row) {
    row = body.insertRow(0);
    row.dataset.order = order.id;
    for (let i = 0; i < 10; i++) row.insertCell();
  }
  const cells = row.cells;
  cells[0].textContent = merged.placedAt ? new Date(merged.placedAt).toLocaleTimeString() : "";
  cells[1].textContent = merged.symbol || "";
  cells[2].textContent = merged.side || "";
  cells[3].textContent = merged.type === "LIMIT" ? `LIMIT ${fmt(merged.limitPrice)}` : merged.type || "";
  cells[4].textContent = fmt(merged.quantity, 0);
  cells[5].textContent = fmt(merged.cumQuantity, 0);
  cells[6].textContent = fmt(merged.averagePrice);
  cells[7].textContent = merged.timeInForce || "";
  cells[8].textContent = merged.status;
  cells[8].dataset.testid = "order-status";
  cells[9].innerHTML = OPEN_STATUSES.includes(merged.status) ? '<button class="small">cancel</button>' : "";
  const button = cells[9].querySelector("button");
  if (button) button.onclick = () => cancelOrder(order.id);
}

async function onOrderUpdate(update) {
  if (!state.orders.has(update.orderId)) {
    const { order } = await gql(`query($id: UUID!) { order(id: $id) { ${ORDER_FIELDS} } }`, { id: update.orderId });
    if (order) showOrder(order);
  }
  showOrder({ id: update.orderId, status: update.status, cumQuantity: update.cumQuantity, averagePrice: update.averagePrice,
    lastPosition: Number(String(update.position).split(":")[1]) });
}

function onAlert(alert) {
  const item = document.createElement("li");
  item.textContent = `${new Date(alert.firedAt).toLocaleTimeString()} ${alert.kind} ${alert.symbol} at ${fmt(alert.price)}`;
  $("alerts").prepend(item);
}

function resubscribePortfolio() {
  while (state.subscriptions.length > 1) state.subscriptions.pop()();
  const id = state.portfolio;
  subscribe(`subscription($id: UUID!, $after: LogPosition) {
      portfolioUpdates(id: $id, after: $after) { position ${PORTFOLIO_FIELDS} } }`, { id },
    (data) => showPortfolio(data.portfolioUpdates), (data) => data.portfolioUpdates.position);
  subscribe(`subscription($id: UUID!, $after: LogPosition) {
      orderUpdates(portfolioId: $id, after: $after) { position orderId status cumQuantity averagePrice } }`,
    { id }, (data) => onOrderUpdate(data.orderUpdates), (data) => data.orderUpdates.position);
  subscribe("subscription($id: UUID!) { alertFired(portfolioId: $id) { kind symbol price firedAt } }", { id },
    (data) => onAlert(data.alertFired));
}

// ---- orders ----------------------------------------------------------------------------------------------

async function placeOrder(event) {
  event.preventDefault();
  if (!state.portfolio) {
    $("order-result").textContent = "no portfolio selected";
    return;
  }
  const type = $("order-type").value;
  const input = {
    portfolioId: state.portfolio,
    symbol: $("order-symbol").value,
    side: $("order-side").value,
    type,
    quantity: $("order-quantity").value.trim(),
    timeInForce: $("order-tif").value,
  };
  if (type === "LIMIT" || type === "STOP_LIMIT") input.limitPrice = $("order-limit").value.trim();
  if (type === "STOP" || type === "STOP_LIMIT") input.stopPrice = $("order-stop").value.trim();
  $("order-result").textContent = "placing…";
  try {
    const { placeOrder } = await gql(`mutation($input: PlaceOrderInput!, $k: String!) {
      placeOrder(input: $input, idempotencyKey: $k, waitForAcceptanceMs: 5000) { orderId status } }`,
      { input, k: crypto.randomUUID() });
    $("order-result").textContent = `order ${placeOrder.orderId.slice(0, 8)}: ${placeOrder.status}`;
    const { order } = await gql(`query($id: UUID!) { order(id: $id) { ${ORDER_FIELDS} } }`, { id: placeOrder.orderId });
    if (order) showOrder(order);
  } catch (error) {
    $("order-result").textContent = `refused: ${error.code || ""} ${error.message}`;
  }
}

async function cancelOrder(id) {
  try {
    await gql("mutation($id: UUID!, $k: String!) { cancelOrder(orderId: $id, idempotencyKey: $k) { lastPosition } }",
      { id, k: `cancel-${id}` });
  } catch (error) {
    $("order-result").textContent = `cancel refused: ${error.code || ""} ${error.message}`;
  }
}

// ---- start -----------------------------------------------------------------------------------------------

async function start() {
  state.token = readToken();
  if (!state.token) {
    $("login").hidden = false;
    setConnection("error", "no token");
    return;
  }
  $("app").hidden = false;
  $("order-submit").disabled = true; // until a portfolio is selected
  priceChart = lineChart($("price-chart"), "price", "#58a6ff");
  equityChart = equityLineChart($("equity-chart"));
  // The curve again every minute (a new point a minute; the live points in between are equity as it changes).
  setInterval(() => state.portfolio && loadPerformance(state.portfolio).catch(() => {}), 60000);
  state.ws = graphqlWs.createClient({
    url: `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/graphql/ws`,
    connectionParams: { authorization: `Bearer ${state.token}` },
    retryAttempts: 1000,
    shouldRetry: () => true,
    on: {
      connected: () => setConnection("live", "live"),
      closed: () => setConnection("", "reconnecting…"),
    },
  });
  try {
    const portfolios = await loadPortfolios();
    await loadPrices();
    subscribe("subscription { priceTicks { symbol price ts } }", {}, (data) => onTick(data.priceTicks));
    if (portfolios.length) await selectPortfolio(portfolios[0].id);
  } catch (error) {
    setConnection("error", error.message);
    if (error.code === "UNAUTHENTICATED") {
      localStorage.removeItem("ledger.token");
      $("login").hidden = false;
    }
  }
}

$("symbol").onchange = (e) => selectSymbol(e.target.value);
$("portfolio").onchange = (e) => selectPortfolio(e.target.value);
$("order-form").onsubmit = placeOrder;
$("order-type").onchange = (e) => {
  $("order-limit").disabled = !["LIMIT", "STOP_LIMIT"].includes(e.target.value);
  $("order-stop").disabled = !["STOP", "STOP_LIMIT"].includes(e.target.value);
};
$("login-form").onsubmit = (e) => {
  e.preventDefault();
  localStorage.setItem("ledger.token", $("token-input").value.trim());
  location.reload();
};
start();
