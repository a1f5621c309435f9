/**
 * qcow2 compressed writes against qemu-img 7.2: whole clusters stored as raw deflate (window bits -12)
 * when smaller, packed into host clusters whose refcount counts the compressed clusters they hold;
 * incompressible clusters stored plainly; qemu-img reads them byte-identically and `check` is clean.
 */
import { readFileSync } from "node:fs";
import { deflateRawSync } from "node:zlib";
import { commandRunner, makeTempDir, missingPeers, pattern, sha256 } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { createQcow2, openQcow2 } from "../src/qcow2/index.ts";

const missing = missingPeers(["qemu-img", "qemu-io"]);
if (missing.length > 0) console.warn(`skipping qcow2 compress tests: missing ${missing.join(", ")}`);

const dir = makeTempDir("blk-q2comp");
afterAll(() => dir.dispose());

const sh = commandRunner(dir.path, 120_000);

interface Check {
  "check-errors"?: number;
  corruptions?: number;
  leaks?: number;
  "compressed-clusters"?: number;
  "allocated-clusters"?: number;
}

async function check(name: string): Promise<{ code: number; json: Check }> {
  const r = await sh("qemu-img", ["check", "--output=json", name], [0, 1, 2, 3]);
  return { code: r.code, json: JSON.parse(r.out) as Check };
}

async function rawSha(name: string): Promise<string> {
  await sh("qemu-img", ["convert", "-O", "raw", name, `${name}.raw`]);
  return sha256(readFileSync(dir.join(`${name}.raw`)));
}

/** Compressible data: `seed`-dependent runs of one byte value. */
function runs(seed: number, size: number): Uint8Array {
  const b = new Uint8Array(size);
  for (let i = 0; i < size; i += 256) b.fill((seed * 31 + i / 256) & 0xff, i, i + 256);
  return b;
}

describe.skipIf(missing.length > 0)("qcow2 compressed writes", () => {
  it.each([
    ["64k", 16],
    ["4k", 16],
    ["512", 16],
    ["64k", 1],
  ] as const)(
    "cluster_size=%s refcount_bits=%i: packed, readable by qemu-img, check clean",
    async (cs, bits) => {
      const f = `c-${cs}-${bits}.qcow2`;
      const clusterSize = cs === "64k" ? 65536 : cs === "4k" ? 4096 : 512;
      // Odd size: the last cluster is partial and is compressed padded with zeroes.
      const size = 40 * clusterSize + 1536;
      await createQcow2({ filename: dir.join(f), size, clusterSize, refcountBits: bits });
      const model = new Uint8Array(size);
      {
        await using img = await openQcow2(dir.join(f), { writable: true });
        img.state.setCompressedWrites(true);
        const put = async (at: number, data: Uint8Array): Promise<void> => {
          model.set(data, at);
          await img.root.write(at, data);
        };
        await put(0, runs(1, 8 * clusterSize)); // compressible clusters, packed
        await put(10 * clusterSize, pattern(7, 0, 2 * clusterSize)); // incompressible: stored plainly
        await put(13 * clusterSize, new Uint8Array(clusterSize)); // all zeroes over zeroes: nothing
        await put(14 * clusterSize + 100, runs(2, 300)); // not a whole cluster: plain
        await put(40 * clusterSize, runs(3, 1536)); // last partial cluster
        await Promise.all([
          put(20 * clusterSize, runs(4, clusterSize)),
          put(21 * clusterSize, runs(5, clusterSize)),
        ]);
      }
      const c = await check(f);
      expect({ code: c.code, corruptions: c.json.corruptions ?? 0, leaks: c.json.leaks ?? 0 }).toEqual({
        code: 0,
        corruptions: 0,
        leaks: 0,
      });
      const shrinks = [0, 1].filter(
        (k) =>
          deflateRawSync(pattern(7, k * clusterSize, clusterSize), { windowBits: 12 }).length < clusterSize,
      ).length;
      expect(c.json["compressed-clusters"]).toBe(10 + Math.ceil(1536 / clusterSize) + shrinks);
      expect(await rawSha(f)).toBe(sha256(model));
      {
        await using img = await openQcow2(dir.join(f));
        expect(sha256(await img.root.read(0, size))).toBe(sha256(model));
      }
      expect(readFileSync(dir.join(f)).length % 512).toBe(0);
    },
  );

  it("qemu-io and blk overwrites of blk's compressed clusters keep check clean", async () => {
    const f = "ow.qcow2";
    await createQcow2({ filename: dir.join(f), size: 1 << 20, clusterSize: 65536 });
    {
      await using img = await openQcow2(dir.join(f), { writable: true });
      img.state.setCompressedWrites(true);
      for (let i = 0; i < 6; i++) await img.root.write(i * 65536, runs(i, 65536));
    }
    await sh("qemu-io", ["-f", "qcow2", "-c", "write -P 0x5a 65536 4k", "-c", "discard 131072 64k", f]);
    expect((await check(f)).code).toBe(0);
    {
      await using img = await openQcow2(dir.join(f), { writable: true });
      await img.root.write(3 * 65536 + 7, new Uint8Array(9).fill(9)); // blk COW of a compressed cluster
    }
    const c = await check(f);
    expect({ code: c.code, compressed: c.json["compressed-clusters"] }).toEqual({ code: 0, compressed: 3 });
    const r = await sh("qemu-io", [
      "-f",
      "qcow2",
      "-c",
      "read -P 0x5a 65536 4k",
      "-c",
      "read -P 9 196615 9",
      f,
    ]);
    expect(r.out).not.toMatch(/Pattern verification failed/);
  });
});
