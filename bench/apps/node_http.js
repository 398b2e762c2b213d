// The Node app of bench/zero_downtime.py for pm2's cluster mode: any request -> 200 "ok\n" on
// 127.0.0.1:$PORT. It shuts down gracefully on SIGINT (what `pm2 reload` sends to an old worker once its
// replacement listens): stop accepting, let the requests in flight finish (Node 19+ also closes idle
// keep-alive connections at server.close()), exit; pm2's kill_timeout (1.6 s) is the backstop.
"use strict";
const http = require("http");

const port = Number(process.env.PORT);
const body = "ok\n";
const server = http.createServer((req, res) => {
  res.writeHead(200, { "content-type": "text/plain", "content-length": body.length });
  res.end(body);
});
server.listen(port, "127.0.0.1");
process.on("SIGINT", () => {
  server.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 1500).unref();
});
