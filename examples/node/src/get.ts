// One HTTP GET to a cluster's apiserver through a clusterconnect relay, with no client proxy:
//
//   node dist/get.js RELAY_HOST:PORT RELAY_CA_FILE CLUSTER TOKEN_FILE [PATH]
//
// Prints the response's status and body; exits 1 on any failure, with one line saying why.
// The token stays in its file (never in argv); inside the tunnel the far end is the cluster's
// auth proxy, which speaks plain HTTP/1.1 (the relay's TLS protects the bytes on the way).
import { readFileSync } from "node:fs";
import http from "node:http";
import { credentials } from "@grpc/grpc-js";
import { ClientTunnelClient } from "./gen/clusterconnect/v1/tunnel";
import { dial } from "./tunnel-socket";

async function main(): Promise<void> {
  const [relay, caFile, cluster, tokenFile, path = "/version"] = process.argv.slice(2);
  if (!relay || !caFile || !cluster || !tokenFile) {
    throw new Error("usage: node dist/get.js RELAY_HOST:PORT RELAY_CA_FILE CLUSTER TOKEN_FILE [PATH]");
  }
  const token = readFileSync(tokenFile, "utf8").trim();
  const client = new ClientTunnelClient(relay, credentials.createSsl(readFileSync(caFile)));
  try {
    const socket = await dial(client, { cluster, token });
    const response = await new Promise<http.IncomingMessage>((resolve, reject) => {
      const request = http.request({
        createConnection: () => socket,
        host: cluster, // only the Host header: the tunnel decides where the bytes go
        path,
        headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
      }, resolve);
      request.on("error", reject);
      request.end();
    });
    let body = "";
    response.setEncoding("utf8");
    for await (const piece of response) body += piece;
    console.log(`${response.statusCode} ${body.trim()}`);
    socket.destroy();
    if (response.statusCode !== 200) process.exitCode = 1;
  } finally {
    client.close();
  }
}

main().catch((error: Error) => {
  console.error(`error: ${error.message}`);
  process.exitCode = 1;
});
