/**
 * The qcow2 interop matrix through blk-img itself (the driver-level matrix is
 * packages/drivers/test/qcow2-interop.test.ts): for each kind of image QEMU writes, blk-img's
 * `info`/`map`/`check` output and exit codes equal qemu-img's, `convert -O raw` gives qemu-img's bytes,
 * and `compare` finds blk's and qemu's conversions identical to the image.
 */
import { readFileSync, writeFileSync } from "node:fs";
import { commandRunner, makeTempDir, pattern, qemuTools, run, sha256 } from "@blk/testkit";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { blk } from "./helpers.ts";
import { missing } from "./qemu.ts";

const dir = makeTempDir("blk-img-q2m");
afterAll(() => dir.dispose());

const sh = commandRunner(dir.path);
const { img, io } = qemuTools(sh);

/** Random data, a compressible text run and a zero gap: what `convert -c` makes every cluster kind of. */
function mixed(name: string, size: number): string {
  const buf = new Uint8Array(size);
  buf.set(pattern(5, 0, size >> 3), 0);
  const text = Buffer.from("blk reads what qemu writes\n".repeat(size >> 5));
  buf.set(text.subarray(0, size >> 2), size >> 1);
  writeFileSync(dir.join(name), buf);
  return name;
}

/** Image name → commands that make it (in the temp dir); each covers a line of issue 8's matrix. */
const images: Record<string, () => Promise<void>> = {
  "compat-0.10": async () => {
    await img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "compat-0.10.qcow2", "8M");
    await io("compat-0.10.qcow2", "write -P 1 0 100k", "write -z 1M 64k", "write -P 2 5M 4k");
  },
  "c512-refcount1": async () => {
    await img(
      "create",
      "-q",
      "-f",
      "qcow2",
      "-o",
      "cluster_size=512,refcount_bits=1",
      "c512-refcount1.qcow2",
      "2M",
    );
    await io("c512-refcount1.qcow2", "write -P 3 0 9k", "write -z 4k 1k", "write -P 4 1500k 3k");
  },
  "c4k-refcount64": async () => {
    await img(
      "create",
      "-q",
      "-f",
      "qcow2",
      "-o",
      "cluster_size=4k,refcount_bits=64",
      "c4k-refcount64.qcow2",
      "4M",
    );
    await io("c4k-refcount64.qcow2", "write -P 5 2k 30k", "discard 8k 8k", "write -z 1M 16k");
  },
  "c2m-zero-discard": async () => {
    await img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", "c2m-zero-discard.qcow2", "12M");
    await io("c2m-zero-discard.qcow2", "write -P 6 1M 3M", "write -z 6M 2M", "discard 2M 2M");
  },
  chain3: async () => {
    await img("create", "-q", "-f", "qcow2", "m-base.qcow2", "8M");
    await io("m-base.qcow2", "write -P 7 0 1M", "write -P 8 6M 64k");
    await img("create", "-q", "-f", "qcow2", "-b", "m-base.qcow2", "-F", "qcow2", "m-mid.qcow2");
    await io("m-mid.qcow2", "write -P 9 64k 64k", "write -z 6M 64k");
    await img("create", "-q", "-f", "qcow2", "-b", "m-mid.qcow2", "-F", "qcow2", "chain3.qcow2", "10M");
    await io(
      "chain3.qcow2",
      "write -P 10 128k 4k",
      "write -z 0 64k",
      "discard 64k 64k",
      "write -P 11 9M 64k",
    );
  },
  "compressed-zlib": async () => {
    await img("convert", "-c", "-O", "qcow2", "-f", "raw", mixed("z.raw", 2 << 20), "compressed-zlib.qcow2");
  },
  "compressed-zstd": async () => {
    const src = mixed("s.raw", 2 << 20);
    await img(
      "convert",
      "-c",
      "-O",
      "qcow2",
      "-o",
      "compression_type=zstd",
      "-f",
      "raw",
      src,
      "compressed-zstd.qcow2",
    );
  },
  "extended-l2": async () => {
    await img("create", "-q", "-f", "qcow2", "x-base.qcow2", "4M");
    await io("x-base.qcow2", "write -P 12 0 4M");
    const o = "extended_l2=on";
    await img(
      "create",
      "-q",
      "-f",
      "qcow2",
      "-o",
      o,
      "-b",
      "x-base.qcow2",
      "-F",
      "qcow2",
      "extended-l2.qcow2",
    );
    await io(
      "extended-l2.qcow2",
      "write -P 13 2k 2k",
      "write -P 14 64k 8k",
      "write -z 130k 4k",
      "write -z 1M 128k",
    );
  },
  snapshot: async () => {
    await img("create", "-q", "-f", "qcow2", "snapshot.qcow2", "4M");
    await io("snapshot.qcow2", "write -P 15 0 128k");
    await img("snapshot", "-c", "first", "snapshot.qcow2");
    await io("snapshot.qcow2", "write -P 16 64k 64k", "write -z 1M 64k");
  },
  bitmap: async () => {
    await img("create", "-q", "-f", "qcow2", "bitmap.qcow2", "4M");
    await img("bitmap", "--add", "bitmap.qcow2", "b0");
    await img("bitmap", "--add", "-g", "128k", "--disable", "bitmap.qcow2", "b1");
    await io("bitmap.qcow2", "write -P 17 0 64k", "write -P 18 2M 64k");
  },
  "lazy-dirty": async () => {
    await img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "lazy-dirty.qcow2", "4M");
    // qemu-io's `abort` leaves the dirty bit set with stale refcounts.
    await run("qemu-io", ["-f", "qcow2", "-c", "write -P 19 0 64k", "-c", "abort", "lazy-dirty.qcow2"], {
      cwd: dir.path,
      timeoutMs: 30_000,
    });
  },
  "leaked-clusters": async () => {
    await img("create", "-q", "-f", "qcow2", "leaked-clusters.qcow2", "4M");
    await io("leaked-clusters.qcow2", "write -P 20 0 64k");
    const p = dir.join("leaked-clusters.qcow2");
    const b = readFileSync(p);
    // Refcount block at 128 KiB (16-bit entries): clusters 6 and 7 counted but unused.
    b.writeUInt16BE(1, 0x20000 + 6 * 2);
    b.writeUInt16BE(1, 0x20000 + 7 * 2);
    writeFileSync(p, b);
  },
};
const names = Object.keys(images);

/** qemu-img's answers, collected once per image. */
const qemuSide = new Map<string, Record<string, { code: number | null; stdout: string; stderr: string }>>();
const commands = (f: string): Record<string, string[]> => ({
  info: ["info", "-U", "--output=json", f],
  chain: ["info", "-U", "--backing-chain", "--output=json", f],
  map: ["map", "-U", "--output=json", f],
  human: ["map", "-U", f],
  check: ["check", "-U", "--output=json", f],
});

describe.skipIf(missing.length > 0)(
  "qcow2 matrix through blk-img vs qemu-img 7.2",
  { timeout: 180_000 },
  () => {
    beforeAll(async () => {
      for (const name of names) {
        await images[name]?.();
        const out: Record<string, { code: number | null; stdout: string; stderr: string }> = {};
        for (const [k, argv] of Object.entries(commands(`${name}.qcow2`))) {
          out[k] = await run("qemu-img", argv, { cwd: dir.path, timeoutMs: 60_000 });
        }
        await img("convert", "-U", "-O", "raw", `${name}.qcow2`, `${name}.q.raw`);
        qemuSide.set(name, out);
      }
    }, 180_000);

    for (const name of names) {
      it(`${name}: info, map, check and convert equal qemu-img's`, async () => {
        const q = qemuSide.get(name);
        if (q === undefined) throw new Error("fixture missing");
        const f = dir.join(`${name}.qcow2`);
        const cmds = commands(f);
        const abs = (s: string): string => s.replaceAll(`"${name}.qcow2"`, JSON.stringify(f));
        for (const k of ["info", "chain", "check"]) {
          const b = await blk(cmds[k] ?? []);
          const want = q[k];
          expect({ k, code: b.code }).toEqual({ k, code: want?.code });
          const parsed = JSON.parse(b.stdout) as unknown;
          const strip = (v: unknown): unknown =>
            JSON.parse(JSON.stringify(v), (key, val: unknown) =>
              key === "actual-size" || key === "filename" || key === "full-backing-filename"
                ? undefined
                : val,
            );
          expect({ k, out: strip(parsed) }).toEqual({
            k,
            out: strip(JSON.parse(abs(want?.stdout ?? "null"))),
          });
        }
        // blk-img gets absolute paths (qemu-img ran in the directory): compare with the directory cut off.
        for (const k of ["map", "human"]) {
          const b = await blk(cmds[k] ?? []);
          expect({ k, code: b.code, stdout: b.stdout.replaceAll(`${dir.path}/`, "") }).toEqual({
            k,
            code: q[k]?.code,
            stdout: q[k]?.stdout,
          });
          expect(b.stderr.replaceAll(`${dir.path}/`, "")).toBe(
            q[k]?.stderr.replaceAll("qemu-img", "blk-img"),
          );
        }
        const braw = dir.join(`${name}.b.raw`);
        expect(await blk(["convert", "-U", "-O", "raw", f, braw])).toMatchObject({ code: 0, stderr: "" });
        expect(sha256(readFileSync(braw))).toBe(sha256(readFileSync(dir.join(`${name}.q.raw`))));
        const c = await blk(["compare", "-U", "-F", "raw", f, braw]);
        expect(c).toMatchObject({ code: 0, stdout: "Images are identical.\n" });
      });
    }
  },
);
