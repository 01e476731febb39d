// A graphql-transport-ws subscriber built on the `graphql-ws` npm client (the one Apollo and urql use).
//   node subscribe.cjs URL TOKEN QUERY [VARIABLES_JSON]
// Prints one JSON line per event: {"type":"connected"}, {"type":"next","data":…}, {"type":"error",…},
// {"type":"complete"}. Exits when the subscription ends or stdin closes.
const { createClient } = require('graphql-ws');
const WebSocket = require('ws');

const [url, token, query, variables] = process.argv.slice(2);
const print = (message) => process.stdout.write(JSON.stringify(message) + '\n');

const client = createClient({
  url,
  webSocketImpl: WebSocket,
  connectionParams: { authorization: `Bearer ${token}` },
  retryAttempts: 0,
  on: { connected: () => print({ type: 'connected' }) },
});

client.subscribe(
  { query, variables: JSON.parse(variables || '{}') },
  {
    next: (result) => print({ type: 'next', data: result.data ?? null, errors: result.errors ?? null }),
    error: (error) => {
      const detail = Array.isArray(error) ? error : (error && (error.message || error.reason)) || String(error);
      print({ type: 'error', error: detail });
      process.exit(1);
    },
    complete: () => {
      print({ type: 'complete' });
      process.exit(0);
    },
  },
);

process.stdin.on('end', () => client.dispose().then(() => process.exit(0)));
process.stdin.resume();
