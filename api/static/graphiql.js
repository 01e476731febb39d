// GraphiQL for the ledger API (loaded by graphiql.html; React 18, ReactDOM and GraphiQL 4 are the UMD globals of
// the vendored builds under /static/vendor/graphiql/).
//
// Queries and mutations: POST /graphql (JSON) with the headers from the headers editor, e.g.
//   {"Authorization": "Bearer <token>"}
// Subscriptions: graphql-transport-ws at /graphql/ws; GraphiQL's fetcher sends the same headers as the
// connection_init payload, which the server reads ({"Authorization": "Bearer …"}).
// Headers are not persisted: a token pasted into the editor lives only as long as the tab.
(function () {
  'use strict';
  var root = document.getElementById('graphiql');
  // Full page (set from here rather than in an inline style so that the page's CSP needs no 'unsafe-inline').
  document.documentElement.style.height = '100%';
  document.body.style.height = '100%';
  document.body.style.margin = '0';
  root.style.height = '100%';

  var wsUrl = (location.protocol === 'https:' ? 'wss:' : 'ws:') + '//' + location.host + '/graphql/ws';
  var fetcher = GraphiQL.createFetcher({ url: '/graphql', subscriptionUrl: wsUrl });

  // GraphiQL keeps tabs and history in localStorage. `shouldPersistHeaders: false` keeps headers out of the saved
  // tabs, but the history plugin saves each run's headers regardless; this wrapper drops every `headers` field from
  // what is written, so a pasted token never reaches the disk (history entries keep their headers in memory).
  var storage = {
    getItem: function (key) { return localStorage.getItem(key); },
    setItem: function (key, value) {
      var parsed;
      try { parsed = JSON.parse(value); } catch (_) { parsed = null; }
      if (parsed !== null && typeof parsed === 'object') {
        value = JSON.stringify(parsed, function (k, v) { return k === 'headers' ? undefined : v; });
      }
      localStorage.setItem(key, value);
    },
    removeItem: function (key) { localStorage.removeItem(key); },
    clear: function () {
      Object.keys(localStorage).forEach(function (key) {
        if (key.indexOf('graphiql:') === 0) localStorage.removeItem(key);
      });
    },
    get length() {
      return Object.keys(localStorage).filter(function (key) { return key.indexOf('graphiql:') === 0; }).length;
    },
  };

  ReactDOM.createRoot(root).render(
    React.createElement(GraphiQL, {
      fetcher: fetcher,
      storage: storage,
      defaultQuery:
        '# ledger GraphQL API\n' +
        '#\n' +
        '# Paste your token into Headers (below):\n' +
        '#   {"Authorization": "Bearer <token>"}\n' +
        '# `ledger token --subject NAME` mints one;\n' +
        '# `ledger demo` prints one. Headers are not saved;\n' +
        '# subscriptions (over /graphql/ws) send them too.\n' +
        '\n' +
        '{\n  __typename\n}\n',
      isHeadersEditorEnabled: true,
      shouldPersistHeaders: false,
      showPersistHeadersSettings: false,
      defaultEditorToolsVisibility: 'headers',
    }),
  );
})();
