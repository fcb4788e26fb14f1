// One tunnelled TCP connection as a Node.js Duplex: the bytes of a ClientTunnel.Dial stream
// (protos/clusterconnect/v1/tunnel.proto), so Node's own HTTP client can speak over it.
import { Duplex } from "node:stream";
import { ClientDuplexStream, Metadata } from "@grpc/grpc-js";
import { Chunk, ClientTunnelClient } from "./gen/clusterconnect/v1/tunnel";

export interface DialOptions {
  cluster: string;
  token: string;
}

class TunnelSocket extends Duplex {
  constructor(private readonly call: ClientDuplexStream<Chunk, Chunk>) {
    super();
    call.on("data", (chunk: Chunk) => {
      // Backpressure: stop reading the stream while Node's reader is full.
      if (chunk.data.length > 0 && !this.push(chunk.data)) call.pause();
      if (chunk.eof) this.push(null);
    });
    call.on("end", () => this.push(null));
    call.on("error", (error) => this.destroy(error));
  }

  _read(): void {
    this.call.resume();
  }

  _write(data: Buffer, _encoding: BufferEncoding, done: (error?: Error | null) => void): void {
    this.call.write(Chunk.fromPartial({ data }), done);
  }

  _final(done: (error?: Error | null) => void): void {
    this.call.end(); // half-close (done_writing): our side has nothing more to send
    done();
  }

  _destroy(error: Error | null, done: (error?: Error | null) => void): void {
    this.call.cancel();
    done(error);
  }
}

// Opens a Dial and resolves once the relay says the cluster's agent accepted it
// (initial metadata x-clusterconnect-open: 1); rejects with the relay's status and message otherwise.
export function dial(client: ClientTunnelClient, options: DialOptions): Promise<Duplex> {
  const metadata = new Metadata();
  metadata.set("x-clusterconnect-cluster", options.cluster);
  metadata.set("authorization", `Bearer ${options.token}`);
  const call = client.dial(metadata);
  return new Promise((resolve, reject) => {
    const refused = (error: Error) => reject(error);
    call.once("error", refused);
    call.once("metadata", (headers: Metadata) => {
      call.removeListener("error", refused);
      if (headers.get("x-clusterconnect-open")[0] === "1") {
        resolve(new TunnelSocket(call));
      } else {
        call.cancel();
        reject(new Error("the relay did not open the connection"));
      }
    });
  });
}
