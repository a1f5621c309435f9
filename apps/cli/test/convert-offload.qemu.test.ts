/**
 * `convert -C` (copy offload), `-W` and the default write order against qemu-img 7.2 on the same files:
 * exit codes, messages, content and allocation (`qemu-img map --output=json`).
 */
import {
  closeSync,
  existsSync,
  mkdtempSync,
  openSync,
  rmSync,
  statSync,
  truncateSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { join } from "node:path";
import { loadSyscalls } from "@blk/drivers/file";
import { pattern } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { blk } from "./helpers.ts";
import { Fixtures, missing, norm, qemu } from "./qemu.ts";

const fx = new Fixtures("blk-img-offload");
afterAll(() => fx.dispose());
const MiB = 1 << 20;

/**
 * 6 MiB: data (with an allocated 1 MiB run of zero bytes inside), a hole, data, a hole at the end; the
 * data pieces are not 2 MiB aligned.
 */
function mixed(dir?: string): string {
  const p = dir === undefined ? fx.path("mixed.raw") : join(dir, "mixed.raw");
  const fd = openSync(p, "w");
  writeSync(fd, pattern(21, 0, MiB + 4096), 0, MiB + 4096, 0);
  writeSync(fd, new Uint8Array(MiB), 0, MiB, MiB + 4096);
  writeSync(fd, pattern(22, 0, 512 * 1024), 0, 512 * 1024, 2 * MiB + 4096);
  writeSync(fd, pattern(23, 0, 1536 * 1024), 0, 1536 * 1024, 3 * MiB + 65536);
  closeSync(fd);
  // The file ends in a hole.
  truncateSync(p, 6 * MiB);
  return p;
}

const mapOf = async (f: string): Promise<string> => (await qemu(["map", "--output=json", f])).stdout;

/** Runs `convert` with both tools; returns both outputs. */
async function convertBoth(flags: string[], src: string, fmt = "raw"): Promise<{ qo: string; bo: string }> {
  const qo = fx.path(`q.${fmt}`);
  const bo = fx.path(`b.${fmt}`);
  const q = await qemu(["convert", ...flags, src, qo]);
  const b = await blk(["convert", ...flags, src, bo]);
  expect({ flags, code: b.code, stdout: b.stdout, stderr: b.stderr }).toEqual({
    flags,
    code: q.code,
    stdout: norm(q.stdout),
    stderr: norm(q.stderr),
  });
  return { qo, bo };
}

/** Counts copy_file_range calls of the file driver while `fn` runs. */
async function countOffload(fn: () => Promise<void>): Promise<number> {
  const sys = loadSyscalls();
  const orig = sys?.copyFileRange;
  if (sys === null || orig === undefined) {
    await fn();
    return -1;
  }
  let calls = 0;
  sys.copyFileRange = (...args) => {
    calls++;
    return orig(...args);
  };
  try {
    await fn();
  } finally {
    sys.copyFileRange = orig;
  }
  return calls;
}

describe.skipIf(missing.length > 0)("convert -C / -W vs qemu-img", { timeout: 120_000 }, () => {
  it.each([[[]], [["-C"]], [["-C", "-m", "1"]], [["-C", "-W"]], [["-W"]]])(
    "raw → raw %j: same messages, content and map as qemu-img",
    async (flags) => {
      const sources = [mixed(), await fx.sparse(), fx.dense(2, 3 * MiB + 512), fx.zeroes()];
      for (const src of sources) {
        const { qo, bo } = await convertBoth(["-f", "raw", "-O", "raw", ...flags], src);
        expect({ src, map: await mapOf(bo) }).toEqual({ src, map: await mapOf(qo) });
        expect((await qemu(["compare", "-f", "raw", "-F", "raw", src, bo])).code).toBe(0);
      }
    },
  );

  it("-C copies data with copy_file_range; without -C the data is read and searched for zeroes", async () => {
    const src = mixed();
    let bo = "";
    const offloaded = await countOffload(async () => {
      bo = fx.path("b.raw");
      expect((await blk(["convert", "-C", "-f", "raw", "-O", "raw", src, bo])).code).toBe(0);
    });
    if (offloaded === -1) return;
    expect(offloaded).toBeGreaterThan(0);
    // The allocated zero run went across as data (nothing looked at it), as with qemu-img -C.
    const map = JSON.parse(await mapOf(bo)) as { start: number; length: number; data: boolean }[];
    expect(map[0]).toMatchObject({ start: 0, data: true });
    expect(map[0]?.length).toBeGreaterThanOrEqual(2 * MiB + 4096);
    const plain = await countOffload(async () => {
      expect((await blk(["convert", "-f", "raw", "-O", "raw", src, fx.path("b.raw")])).code).toBe(0);
    });
    expect(plain).toBe(0);
  });

  it("-C concatenates several sources (one of an unaligned size) like qemu-img", async () => {
    const odd = fx.path("odd.raw");
    writeFileSync(odd, pattern(31, 0, 12345));
    const srcs = [odd, mixed(), await fx.sparse()];
    const qo = fx.path("q.raw");
    const bo = fx.path("b.raw");
    expect((await qemu(["convert", "-C", "-f", "raw", "-O", "raw", ...srcs, qo])).code).toBe(0);
    expect((await blk(["convert", "-C", "-f", "raw", "-O", "raw", ...srcs, bo])).code).toBe(0);
    expect(await mapOf(bo)).toBe(await mapOf(qo));
    expect((await qemu(["compare", "-f", "raw", "-F", "raw", qo, bo])).code).toBe(0);
  });

  it("raw → qcow2: same map as qemu-img (clusters laid out in guest order)", async () => {
    for (const src of [mixed(), fx.dense(5, 5 * MiB)]) {
      const { qo, bo } = await convertBoth(["-f", "raw", "-O", "qcow2"], src, "qcow2");
      expect({ src, map: await mapOf(bo) }).toEqual({ src, map: await mapOf(qo) });
      expect((await qemu(["compare", "-f", "raw", "-F", "qcow2", src, bo])).code).toBe(0);
    }
  });

  it("-C raw → qcow2: the qcow2 driver cannot offload, so blk reads and writes; same content", async () => {
    // qemu-img offloads into qcow2 data clusters; blk falls back, which searches the data for zero runs:
    // without such runs in the source, the maps are equal too.
    const dense = fx.dense(5, 5 * MiB);
    const { qo, bo } = await convertBoth(["-C", "-f", "raw", "-O", "qcow2"], dense, "qcow2");
    expect(await mapOf(bo)).toBe(await mapOf(qo));
    const src = mixed();
    const { bo: mixedOut } = await convertBoth(["-C", "-f", "raw", "-O", "qcow2"], src, "qcow2");
    expect((await qemu(["compare", "-f", "raw", "-F", "qcow2", src, mixedOut])).code).toBe(0);
  });

  it("-W raw → qcow2: same content (the layout may differ)", async () => {
    const src = mixed();
    const { bo } = await convertBoth(["-f", "raw", "-O", "qcow2", "-W"], src, "qcow2");
    expect((await qemu(["compare", "-f", "raw", "-F", "qcow2", src, bo])).code).toBe(0);
  });

  const shm = "/dev/shm";
  const crossFs = existsSync(shm) && statSync(shm).dev !== statSync(fx.dir.path).dev;
  it.skipIf(!crossFs)("-C from another file system falls back to read and write, like qemu-img", async () => {
    const other = mkdtempSync(join(shm, "blk-img-offload-"));
    try {
      const src = mixed(other);
      const { qo, bo } = await convertBoth(["-C", "-f", "raw", "-O", "raw"], src);
      expect(await mapOf(bo)).toBe(await mapOf(qo));
      expect((await qemu(["compare", "-f", "raw", "-F", "raw", src, bo])).code).toBe(0);
    } finally {
      rmSync(other, { recursive: true, force: true });
    }
  });

  it.each([
    [["-C", "-S", "4k"]],
    [["-C", "-S", "0"]],
    [["-C", "-c", "-O", "qcow2"]],
    [["-C", "-c", "-S", "4k"]],
    [["-C", "-S", "4k", "-m", "17"]],
    [["--target-image-opts"]],
    [["-C", "-S", "4k", "--target-image-opts"]],
    [["--target-image-opts", "--image-opts", "-f", "raw"]],
  ])("errors %j: same message and exit code", async (flags) => {
    const src = fx.dense(7, MiB);
    const b = await blk(["convert", ...flags, src, fx.path("e.raw")]);
    const q = await qemu(["convert", ...flags, src, fx.path("e.raw")]);
    expect({ code: b.code, stderr: b.stderr }).toEqual({ code: q.code, stderr: norm(q.stderr) });
  });
});
