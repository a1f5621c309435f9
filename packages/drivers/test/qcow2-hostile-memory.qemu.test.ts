/**
 * Hostile qcow2 images cannot make blk allocate without bound: a child process (plain Node on the built
 * @blk/drivers, test/fixtures/qcow2-hostile-child.mjs) opens, reads, maps, checks and queries mutated
 * images under an address-space limit (`prlimit --as`) and a small JS heap. A driver that sized a
 * buffer from an unchecked header field (an L1 table of 2^32 entries, a refcount table of 2^31 clusters)
 * would get a RangeError there instead of quietly reserving gigabytes; every mutant must give a BlkError
 * or a result, and the child's peak resident memory stays small.
 *
 * Needs dist/ (the suite builds first) and prlimit. Runs: BLK_FUZZ_MEMORY_RUNS (default 400);
 * seed: BLK_FUZZ_SEED.
 */
import { existsSync, statSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { commandRunner, makeTempDir, missingPeers, pattern, run } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";

const RUNS = Number(process.env.BLK_FUZZ_MEMORY_RUNS ?? 400);
const SEED = Number(process.env.BLK_FUZZ_SEED ?? 0x5eed1234);
/** Address space for the child: Node itself needs about 1 GiB of reservations; QEMU's own table limits fit. */
const AS_LIMIT = 1536 * 1024 * 1024;
const MAX_RSS_MIB = 400;

const CHILD = fileURLToPath(new URL("./fixtures/qcow2-hostile-child.mjs", import.meta.url));
const DIST = fileURLToPath(new URL("../dist/qcow2/state.js", import.meta.url));
const SRC = fileURLToPath(new URL("../src/qcow2/state.ts", import.meta.url));
const built = existsSync(DIST);
if (!built) console.warn("skipping the qcow2 hostile-memory test: packages/drivers/dist is not built");
else if (statSync(DIST).mtimeMs < statSync(SRC).mtimeMs)
  console.warn("qcow2 hostile-memory test: dist/ is older than src/ — the child runs the last build");
const missing = missingPeers(["qemu-img", "qemu-io", "prlimit"]);
if (missing.length > 0) console.warn(`skipping the qcow2 hostile-memory test: missing ${missing.join(", ")}`);

const dir = makeTempDir("blk-q2mem");
afterAll(() => dir.dispose());

const sh = commandRunner(dir.path, 30_000);

/**
 * Seed images QEMU wrote: cluster kinds, 512 B and 64 KiB clusters, subclusters, a snapshot, a bitmap, a
 * backing name (2 MiB clusters would make 10 MiB mutants: too slow for this run).
 */
async function seeds(): Promise<string[]> {
  const raw = new Uint8Array(1 << 20);
  raw.set(pattern(3, 0, 200_000));
  raw.fill(0x61, 400_000, 800_000);
  writeFileSync(dir.join("s.raw"), raw);
  await sh("qemu-img", ["convert", "-c", "-O", "qcow2", "-f", "raw", "s.raw", "zlib.qcow2"]);
  await sh("qemu-img", [
    "create",
    "-q",
    "-f",
    "qcow2",
    "-o",
    "cluster_size=512,refcount_bits=1",
    "c512.qcow2",
    "1M",
  ]);
  await sh("qemu-io", ["-f", "qcow2", "-c", "write -P 1 0 20k", "-c", "write -z 100k 4k", "c512.qcow2"]);
  await sh("qemu-img", [
    "create",
    "-q",
    "-f",
    "qcow2",
    "-o",
    "extended_l2=on,cluster_size=32k",
    "ext.qcow2",
    "2M",
  ]);
  await sh("qemu-io", ["-f", "qcow2", "-c", "write -P 3 1k 3k", "-c", "write -z 64k 8k", "ext.qcow2"]);
  await sh("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "s.raw", "-F", "raw", "snap.qcow2", "2M"]);
  await sh("qemu-io", ["-f", "qcow2", "-c", "write -P 4 0 128k", "snap.qcow2"]);
  await sh("qemu-img", ["snapshot", "-c", "s1", "snap.qcow2"]);
  await sh("qemu-img", ["bitmap", "--add", "snap.qcow2", "b1"]);
  await sh("qemu-io", ["-f", "qcow2", "-c", "write -P 5 64k 64k", "snap.qcow2"]);
  return ["zlib", "c512", "ext", "snap"].map((n) => dir.join(`${n}.qcow2`));
}

describe.skipIf(!built || missing.length > 0)("qcow2 hostile images: bounded memory", () => {
  it(`${RUNS} mutants under a ${AS_LIMIT >> 20} MiB address-space limit: BlkErrors or results`, async () => {
    const files = await seeds();
    const r = await run(
      "prlimit",
      [
        `--as=${AS_LIMIT}`,
        "--",
        process.execPath,
        "--max-old-space-size=192",
        CHILD,
        String(RUNS),
        String(SEED),
        ...files,
      ],
      { timeoutMs: 240_000 },
    );
    expect(r.stderr, `BLK_FUZZ_SEED=${SEED}`).toBe("");
    expect(r.code).toBe(0);
    const res = JSON.parse(r.stdout) as {
      runs: number;
      outcomes: { refused: number; clean: number; errors: number };
      maxRssMiB: number;
    };
    expect(res.runs).toBe(RUNS);
    // Both refusals at open and images that open (and then read, map, check) must occur.
    expect(res.outcomes.refused).toBeGreaterThan(0);
    expect(res.outcomes.clean + res.outcomes.errors).toBeGreaterThan(0);
    expect(res.maxRssMiB).toBeGreaterThan(0);
    expect(res.maxRssMiB).toBeLessThan(MAX_RSS_MIB);
  }, 300_000);
});
