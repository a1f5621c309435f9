// Throughput of the QMP wire codec: the streaming reader on a realistic client stream (many small
// commands, some large blockdev-add arguments) and the QEMU-style encoder on a large answer.
// Correctness first: the reader must give the same messages whole and split, and the encoder's output must
// read back to the same value. Timings are informative only; they never gate CI.
import { bench, describe, expect } from "vitest";
import { encodeQmpJson, type QmpJsonMessage, QmpJsonReader } from "../src/index.ts";

const command = (i: number): string =>
  `{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "n${i}", "file": {"driver": "file", "filename": "/tmp/qsd/img-${i}.qcow2"}, "cache": {"direct": false}}, "id": ${i}}\r\n`;
const stream = Buffer.from(Array.from({ length: 2000 }, (_, i) => command(i)).join(""));
const chunks: Buffer[] = [];
for (let off = 0; off < stream.length; off += 1500) chunks.push(stream.subarray(off, off + 1500));

const whole = new QmpJsonReader().pushAll(stream);
const split = ((): QmpJsonMessage[] => {
  const r = new QmpJsonReader();
  return chunks.flatMap((c) => r.pushAll(c));
})();
expect(split).toEqual(whole);
expect(whole).toHaveLength(2000);

const answer = {
  return: Array.from({ length: 500 }, (_, i) => ({
    "node-name": `n${i}`,
    drv: "qcow2",
    image: { filename: `/tmp/qsd/img-${i}.qcow2`, "virtual-size": 67108864, "actual-size": 12849152 },
    cache: { "no-flush": false, direct: false, writeback: true },
  })),
  id: 22,
};
const encoded = encodeQmpJson(answer);
expect(new QmpJsonReader().pushAll(Buffer.from(encoded))).toEqual([{ ok: true, value: answer }]);

describe("QmpJsonReader", () => {
  bench(`read ${stream.length} bytes (2000 commands) in 1500-byte chunks`, () => {
    const r = new QmpJsonReader();
    for (const c of chunks) r.pushAll(c);
  });
  bench("JSON.parse per line (reference, no streaming, no QEMU rules)", () => {
    for (const line of stream.toString().split("\r\n")) if (line) JSON.parse(line);
  });
});

describe("encodeQmpJson", () => {
  bench(`encode a ${encoded.length}-byte answer`, () => {
    encodeQmpJson(answer);
  });
  bench("JSON.stringify (reference, not QEMU's format)", () => {
    JSON.stringify(answer);
  });
});
