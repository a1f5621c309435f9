/**
 * Refcount table growth and resize through the driver, checked with qemu-img / qemu-io 7.2: images with
 * 512-byte clusters (whose reftable fills after a few MiB) written past several growths stay `qemu-img
 * check` clean and read as the model; QEMU keeps writing to an image blk grew and the other way round; a
 * crash at any point of a growth or a resize (writes after the last flush lost at random) leaves at most
 * leaked clusters, never a corruption, and an image QEMU opens.
 */
import { readFileSync, writeFileSync } from "node:fs";
import { commandRunner, makeTempDir, missingPeers, pattern, rng } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { createQcow2, openQcow2 } from "../src/qcow2/index.ts";
import { type LogEntry, logFileWrites } from "./fixtures/qcow2/helpers.ts";

const missing = missingPeers(["qemu-img", "qemu-io"]);
if (missing.length > 0) console.warn(`skipping qcow2 growth tests: missing ${missing.join(", ")}`);

/** Crash points tried per scenario (QCOW2_GROW_CUTS raises it). */
const CUTS = Number(process.env.QCOW2_GROW_CUTS ?? 12);

const dir = makeTempDir("blk-q2g");
afterAll(() => dir.dispose());

const sh = commandRunner(dir.path, 120_000);

interface CheckJson {
  corruptions?: number;
  leaks?: number;
  "check-errors"?: number;
}

async function qcheck(name: string): Promise<{ code: number; json: CheckJson }> {
  const r = await sh("qemu-img", ["check", "--output=json", name], [0, 1, 2, 3]);
  return { code: r.code, json: JSON.parse(r.out) as CheckJson };
}

/** `qemu-img compare` of the image with a raw model file: true when identical. */
async function sameAs(name: string, model: Uint8Array): Promise<boolean> {
  writeFileSync(dir.join(`${name}.model`), model);
  const r = await sh("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", name, `${name}.model`], [0, 1]);
  return r.code === 0;
}

/** The file after a crash following log entry `k`: writes after the last flush kept or lost at random. */
function crashed(initial: Uint8Array, log: readonly LogEntry[], k: number, seed: number): Buffer {
  let lastFlush = -1;
  for (let i = 0; i < k; i++) if (log[i] === "flush") lastFlush = i;
  let image = Buffer.from(initial);
  let rnd = seed >>> 0;
  for (let i = 0; i < k; i++) {
    const e = log[i];
    if (e === undefined || e === "flush") continue;
    rnd = (Math.imul(rnd, 1103515245) + 12345) >>> 0;
    if (i > lastFlush && (rnd & 0x10000) !== 0) continue;
    const end = e.offset + e.data.length;
    if (end > image.length) {
      const grown = Buffer.alloc(end);
      image.copy(grown);
      image = grown;
    }
    image.set(e.data, e.offset);
  }
  return image;
}

let n = 0;
async function fresh(size: number, clusterSize: number, refcountBits = 16): Promise<string> {
  const name = `g${n++}.qcow2`;
  await createQcow2({ filename: dir.join(name), size, clusterSize, refcountBits });
  return name;
}

describe.skipIf(missing.length > 0)("qcow2 refcount table growth and resize", { tags: ["qemu"] }, () => {
  it.each([[64, 512]])(
    "refcount_bits=%i, %i-byte clusters: random writes past several growths",
    async (bits, cs) => {
      const size = 4 << 20;
      const name = await fresh(size, cs, bits);
      const model = new Uint8Array(size);
      const r = rng(bits * 7 + cs);
      {
        await using img = await openQcow2(dir.join(name), { writable: true, discard: "unmap" });
        const before = img.state.header.refcountTableOffset;
        for (let i = 0; i < 24; i++) {
          const len = Math.floor(r() * 32 + 1) * cs;
          const off = Math.floor(r() * ((size - len) / 512)) * 512;
          if (r() < 0.15) {
            await img.root.discard(off, len);
            const a = Math.ceil(off / cs) * cs;
            const b = Math.floor((off + len) / cs) * cs;
            if (b > a) model.fill(0, a, b);
          } else {
            const data = pattern(i + 1, off, len);
            await img.root.write(off, data);
            model.set(data, off);
          }
        }
        // Fill most of the disk so that the table must have grown.
        const bulk = pattern(99, 1 << 20, 5 << 19);
        await img.root.write(1 << 20, bulk);
        model.set(bulk, 1 << 20);
        await img.root.flush();
        expect(img.state.header.refcountTableOffset).not.toBe(before);
        expect(Buffer.from(await img.root.read(0, size)).equals(model)).toBe(true);
      }
      const c = await qcheck(name);
      expect(c.json).toMatchObject({ "check-errors": 0 });
      expect(c.code).toBe(0);
      expect(await sameAs(name, model)).toBe(true);
      // qemu-io spot check of a few places
      const at = (3 << 20) + 512;
      const expected = model[at] ?? 0;
      const io = await sh("qemu-io", ["-f", "qcow2", "-c", `read -P ${expected} ${at} 1`, name], [0, 1]);
      expect(io.out).not.toContain("Pattern verification failed");
      expect(io.code).toBe(0);
    },
  );

  it("QEMU writes on after blk grew the table, and blk after QEMU did", async () => {
    const name = await fresh(8 << 20, 512, 64);
    {
      await using img = await openQcow2(dir.join(name), { writable: true });
      await img.root.write(0, pattern(5, 0, 9 << 18));
    }
    await sh("qemu-io", ["-f", "qcow2", "-c", "write -P 0x5a 3M 1M", name]);
    {
      await using img = await openQcow2(dir.join(name), { writable: true });
      await img.root.write(4 << 20, pattern(6, 4 << 20, 1 << 20));
      expect(Buffer.from(await img.root.read(0, 9 << 18)).equals(pattern(5, 0, 9 << 18))).toBe(true);
    }
    const c = await qcheck(name);
    expect(c.code).toBe(0);
    const model = new Uint8Array(8 << 20);
    model.set(pattern(5, 0, 9 << 18));
    model.fill(0x5a, 3 << 20, 4 << 20);
    model.set(pattern(6, 4 << 20, 1 << 20), 4 << 20);
    expect(await sameAs(name, model)).toBe(true);
  });

  it("preallocation=metadata never maps the new area onto freed clusters (it reads as zeroes)", async () => {
    const name = await fresh(1 << 20, 4096);
    {
      await using img = await openQcow2(dir.join(name), { writable: true, discard: "unmap", resize: true });
      await img.root.write(0, pattern(8, 0, 1 << 20));
      await img.root.discard(64 << 10, 256 << 10); // freed clusters, their old bytes still in the file
      await img.root.truncate(3 << 20, { preallocation: "metadata" });
      const map = await img.node.blockStatus(1 << 20, 2 << 20);
      expect(map[0]).toMatchObject({ data: true, allocated: true });
      expect(Buffer.from(await img.root.read(1 << 20, 2 << 20)).equals(Buffer.alloc(2 << 20))).toBe(true);
    }
    const c = await qcheck(name);
    expect(c.code).toBe(0);
    const model = new Uint8Array(3 << 20);
    model.set(pattern(8, 0, 1 << 20));
    model.fill(0, 64 << 10, 320 << 10);
    expect(await sameAs(name, model)).toBe(true);
  });

  /** Runs `work` with the file log on, then tries CUTS crash points (plus each flush) on copies. */
  async function crashPoints(
    name: string,
    work: (img: Awaited<ReturnType<typeof openQcow2>>) => Promise<void>,
  ): Promise<number> {
    const initial = readFileSync(dir.join(name));
    const log: LogEntry[] = [];
    {
      await using img = await openQcow2(dir.join(name), { writable: true, discard: "unmap" });
      logFileWrites(img.node, log);
      await work(img);
    }
    const flushes = log.flatMap((e, i) => (e === "flush" ? [i, i + 1] : []));
    const r = rng(log.length);
    const cuts = new Set<number>();
    const step = Math.max(1, Math.floor(flushes.length / CUTS));
    for (let i = 0; i < flushes.length; i += step) cuts.add(flushes[i] ?? 0);
    for (let i = 0; i < CUTS; i++) cuts.add(Math.floor(r() * (log.length + 1)));
    for (const k of cuts) {
      const copy = `${name}.cut${k}`;
      writeFileSync(dir.join(copy), crashed(initial, log, k, k * 31 + 7));
      const c = await qcheck(copy);
      const why = JSON.stringify({ k, n: log.length, c: c.json });
      expect(c.json.corruptions ?? 0, why).toBe(0);
      expect(c.json["check-errors"] ?? 0, why).toBe(0);
      expect([0, 3], why).toContain(c.code);
    }
    return cuts.size;
  }

  it("a crash at any point of a refcount table growth leaves at most leaks", async () => {
    const name = await fresh(4 << 20, 512, 64);
    {
      // just below the first growth
      await using img = await openQcow2(dir.join(name), { writable: true });
      await img.root.write(0, pattern(1, 0, 1900 << 10));
    }
    const tried = await crashPoints(name, async (img) => {
      const t = img.state.header.refcountTableOffset;
      await img.root.write(1900 << 10, pattern(2, 1900 << 10, 512 << 10));
      expect(img.state.header.refcountTableOffset).not.toBe(t);
    });
    expect(tried).toBeGreaterThan(CUTS / 2);
  });

  it("a crash at any point of a resize (L1 growth, shrink) leaves at most leaks", async () => {
    const name = await fresh(1 << 20, 512, 16);
    {
      await using img = await openQcow2(dir.join(name), { writable: true });
      await img.root.write(0, pattern(3, 0, 1 << 20));
    }
    await crashPoints(name, async (img) => {
      await img.node.truncate(64 << 20);
      await img.root.write(40 << 20, pattern(4, 40 << 20, 64 << 10));
      await img.node.truncate(512 << 10);
      await img.node.truncate(3 << 20);
    });
    const c = await qcheck(name);
    expect(c.code).toBe(0);
    const model = new Uint8Array(3 << 20);
    model.set(pattern(3, 0, 512 << 10));
    expect(await sameAs(name, model)).toBe(true);
  });
});
