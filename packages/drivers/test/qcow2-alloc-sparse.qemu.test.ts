/**
 * Allocating writes that fill only part of a new cluster whose other bytes read as zeroes (no backing
 * file, or a plain zero cluster): when the host cluster lies past everything ever written to the file,
 * only the request's bytes are written (the rest of the cluster is a hole); a host cluster that may hold
 * old bytes (reused after a discard) and the batch's last host cluster are written whole. Checked against
 * a model through blk, `qemu-img compare` and `qemu-img check`, and on the file writes the driver sends.
 */
import { readFileSync, statSync, writeFileSync } from "node:fs";
import type { BlockNode } from "@blk/core";
import { commandRunner, makeTempDir, missingPeers, pattern } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { createQcow2, openQcow2 } from "../src/qcow2/index.ts";

const missing = missingPeers(["qemu-img"]);
if (missing.length > 0) console.warn(`skipping qcow2 sparse allocation tests: missing ${missing.join(", ")}`);

const dir = makeTempDir("blk-q2sparse");
afterAll(() => dir.dispose());

const sh = commandRunner(dir.path);

/** `qemu-img check` is clean (no corruption, no leaks) and `qemu-img compare` finds `model`. */
async function agreesWithQemu(name: string, model: Uint8Array): Promise<void> {
  const c = await sh("qemu-img", ["check", "--output=json", name], [0, 1, 2, 3]);
  expect(c.code).toBe(0);
  const json = JSON.parse(c.out) as { leaks?: number; corruptions?: number };
  expect(json.leaks ?? 0).toBe(0);
  expect(json.corruptions ?? 0).toBe(0);
  writeFileSync(dir.join(`${name}.model`), model);
  expect(
    (await sh("qemu-img", ["compare", "-q", "-f", "raw", "-F", "qcow2", `${name}.model`, name])).code,
  ).toBe(0);
}

/** The first offset where `a` and `b` differ, or -1 (a deep `toEqual` of MiBs is far too slow). */
function firstDiff(a: Uint8Array, b: Uint8Array): number {
  if (Buffer.compare(a, b) === 0) return -1;
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return n;
}

type Logged = { offset: number; length: number };

/** Records the offset and length of every write the qcow2 node sends to its file. */
function logFileWrites(node: BlockNode, log: Logged[]): void {
  const file = node.children.get("file")?.child;
  if (file === undefined) throw new Error("no file child");
  const st = file.state as unknown as { write(o: number, d: Uint8Array, f?: unknown): Promise<void> };
  const write = st.write.bind(st);
  st.write = (o, d, f) => {
    log.push({ offset: o, length: d.length });
    return write(o, d, f);
  };
}

describe.skipIf(missing.length > 0)("qcow2 partial allocating writes", { tags: ["qemu"] }, () => {
  it("writes only the request's bytes into a new cluster past the end of the file", async () => {
    const cs = 65536;
    const size = 4 << 20;
    const name = "span.qcow2";
    await createQcow2({ filename: dir.join(name), size });
    const model = new Uint8Array(size);
    const log: Logged[] = [];
    {
      await using img = await openQcow2(dir.join(name), { writable: true });
      logFileWrites(img.node, log);
      // One request over the end of guest cluster 2 and the start of guest cluster 3: one batch of two
      // new clusters, the first one partial and below the second one.
      const data = pattern(7, 0, 4096);
      await img.root.write(3 * cs - 2048, data);
      model.set(data, 3 * cs - 2048);
      expect(firstDiff(await img.root.read(0, size), model)).toBe(-1);
    }
    // The lower cluster got only its 2 KiB; the last one was written whole (the file ends at a cluster).
    expect(log.some((w) => w.length === 2048 && w.offset % cs === cs - 2048)).toBe(true);
    expect(log.some((w) => w.length === cs)).toBe(true);
    expect(statSync(dir.join(name)).size % cs).toBe(0);
    await agreesWithQemu(name, model);
  });

  it("many concurrent partial writes into new clusters read back as the model", async () => {
    const cs = 65536;
    const size = 16 << 20;
    const name = "scatter.qcow2";
    await createQcow2({ filename: dir.join(name), size });
    const model = new Uint8Array(size);
    {
      await using img = await openQcow2(dir.join(name), { writable: true });
      // Rounds of 24 requests at once on disjoint 8 KiB slots (shifted by 6 KiB, so that every eighth one
      // spans two clusters): sub-cluster writes, several in one cluster (a batch merges them). Later
      // rounds write over earlier ones, in allocated clusters or not.
      for (let round = 0; round < 8; round++) {
        const reqs: Promise<void>[] = [];
        for (let k = 0; k < 24; k++) {
          const slot = ((round * 24 + k) * 1031) % (size / 8192 - 1);
          const at = slot * 8192 + 6144 + (k % 3) * 512;
          const len = 512 * (1 + ((k * 7 + round) % 6));
          const data = pattern(round * 100 + k, at, len);
          model.set(data, at);
          reqs.push(img.root.write(at, data));
        }
        await Promise.all(reqs);
      }
      expect(firstDiff(await img.root.read(0, size), model)).toBe(-1);
    }
    expect(statSync(dir.join(name)).size % cs).toBe(0);
    await agreesWithQemu(name, model);
    // Reopened: the entries and the holes read the same.
    await using again = await openQcow2(dir.join(name));
    expect(firstDiff(await again.root.read(0, size), model)).toBe(-1);
  });

  it("a reused cluster is written whole: no old bytes show around a partial write", async () => {
    const cs = 4096;
    const size = 1 << 20;
    const name = "reuse.qcow2";
    await createQcow2({ filename: dir.join(name), size, clusterSize: cs });
    const model = new Uint8Array(size);
    {
      await using img = await openQcow2(dir.join(name), { writable: true, discard: "unmap" });
      const old = pattern(1, 0, 64 * cs);
      await img.root.write(0, old);
      await img.root.flush();
      // Free those clusters, then write small pieces elsewhere: they get the freed host clusters.
      await img.root.discard(0, 64 * cs);
      await img.root.flush();
      const reqs: Promise<void>[] = [];
      for (let k = 0; k < 32; k++) {
        const at = (100 + k * 3) * cs + 1000;
        const data = pattern(50 + k, at, 700);
        model.set(data, at);
        reqs.push(img.root.write(at, data));
      }
      await Promise.all(reqs);
      expect(firstDiff(await img.root.read(0, size), model)).toBe(-1);
    }
    await agreesWithQemu(name, model);
    // The freed clusters were reused (the file did not grow by the new clusters).
    expect(statSync(dir.join(name)).size).toBeLessThan(80 * cs + 64 * 1024);
    expect(readFileSync(dir.join(name)).length).toBe(statSync(dir.join(name)).size);
  });
});
