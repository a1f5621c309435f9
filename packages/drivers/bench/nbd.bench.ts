/**
 * The NBD codec on bytes alone: parsing a stream of 1024 pipelined READ requests, and 256 WRITE requests
 * carrying 4 KiB each (zero-copy payload views), fed in 64 KiB chunks as a socket delivers them; and
 * encoding the matching structured reply headers. Before timing, the parse is checked against the requests
 * encoded, so nothing wrong is measured.
 */
import { strictEqual } from "node:assert/strict";
import { bench, describe } from "vitest";
import {
  encodeClientFlags,
  encodeInfoRequestData,
  encodeOffsetDataHeader,
  encodeOption,
  encodeRequest,
  NBD_CMD,
  NBD_OPT,
  NbdClientStreamParser,
} from "../src/nbd/index.ts";

const prelude = Buffer.concat([
  encodeClientFlags(3),
  encodeOption(NBD_OPT.GO, encodeInfoRequestData("disk", [3])),
]);
const reads = Buffer.concat(
  Array.from({ length: 1024 }, (_, i) =>
    encodeRequest({ flags: 0, type: NBD_CMD.READ, cookie: BigInt(i), offset: i * 4096, length: 4096 }),
  ),
);
const writes = Buffer.concat(
  Array.from({ length: 256 }, (_, i) =>
    Buffer.concat([
      encodeRequest({ flags: 0, type: NBD_CMD.WRITE, cookie: BigInt(i), offset: i * 4096, length: 4096 }),
      Buffer.alloc(4096, i & 0xff),
    ]),
  ),
);

function chunks(b: Buffer, size: number): Buffer[] {
  const out: Buffer[] = [];
  for (let i = 0; i < b.length; i += size) out.push(b.subarray(i, i + size));
  return out;
}
const readChunks = chunks(reads, 65536);
const writeChunks = chunks(writes, 65536);

function parse(stream: Buffer[]): number {
  const p = new NbdClientStreamParser();
  p.push(prelude);
  p.next();
  p.next();
  p.enterTransmission();
  let n = 0;
  let bytes = 0;
  for (const c of stream) {
    p.push(c);
    for (let m = p.next(); m !== undefined; m = p.next()) {
      n++;
      if (m.kind === "request") bytes += m.data?.length ?? 0;
    }
  }
  return n * 1e7 + bytes;
}

// Correctness first: every request is seen, with every payload byte.
strictEqual(parse(readChunks), 1024 * 1e7);
strictEqual(parse(writeChunks), 256 * 1e7 + 256 * 4096);

describe("NBD codec", () => {
  bench("parse 1024 READ requests (64 KiB chunks)", () => {
    parse(readChunks);
  });
  bench("parse 256 × 4 KiB WRITE requests (64 KiB chunks)", () => {
    parse(writeChunks);
  });
  bench("encode 1024 OFFSET_DATA headers", () => {
    for (let i = 0; i < 1024; i++) encodeOffsetDataHeader(1, BigInt(i), i * 4096, 4096);
  });
});
