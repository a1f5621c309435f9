/** Side-by-side helpers: the same command through qemu-img and blk-img, output normalised for comparison. */
import { writeFileSync } from "node:fs";
import { makeTempDir, missingPeers, pattern, run, type TempDir } from "@blk/testkit";
import { blk, type Captured } from "./helpers.ts";

/** Peers missing for the side-by-side tests (empty when qemu-img and qemu-io are installed). */
export const missing: string[] = missingPeers(["qemu-img", "qemu-io"]);
if (missing.length > 0)
  console.warn(`skipping blk-img vs qemu-img comparisons: missing ${missing.join(", ")}`);

/** Runs qemu-img. */
export async function qemu(argv: readonly string[]): Promise<Captured> {
  const r = await run("qemu-img", argv, { timeoutMs: 30_000 });
  return { code: r.code ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** Replaces the program name so that messages compare equal. */
export function norm(text: string): string {
  return text.replaceAll("qemu-img", "blk-img");
}

/** Runs both tools with the same arguments. */
export async function both(argv: readonly string[]): Promise<{ q: Captured; b: Captured }> {
  const q = await qemu(argv);
  const b = await blk(argv);
  return { q: { ...q, stdout: norm(q.stdout), stderr: norm(q.stderr) }, b };
}

/** Runs qemu-io commands on a raw image. */
export async function qemuIo(file: string, ...cmds: string[]): Promise<void> {
  const args = ["-f", "raw"];
  for (const c of cmds) args.push("-c", c);
  const r = await run("qemu-io", [...args, file], { timeoutMs: 30_000 });
  if (r.code !== 0) throw new Error(`qemu-io failed: ${r.stderr}`);
}

/** Fixture images, each made fresh on demand (so both tools can get identical copies). */
export class Fixtures {
  readonly dir: TempDir;
  #n = 0;
  constructor(prefix: string) {
    this.dir = makeTempDir(prefix);
  }
  /** A fresh path in the temp dir. */
  path(name: string): string {
    return this.dir.join(`${this.#n++}-${name}`);
  }
  /** 4 MiB sparse raw made by qemu-img create, with data at 64k (64k of 0x11) and 1M (4k of 0x22). */
  async sparse(name = "sparse.raw"): Promise<string> {
    const p = this.path(name);
    await qemu(["create", "-q", "-f", "raw", p, "4M"]);
    await qemuIo(p, "write -P 0x11 64k 64k", "write -P 0x22 1M 4k");
    return p;
  }
  /** Fully allocated raw of pattern data, `size` bytes (default 1.5 MiB + 512). */
  dense(seed = 1, size = (3 << 19) + 512, name = "dense.raw"): string {
    const p = this.path(name);
    writeFileSync(p, pattern(seed, 0, size));
    return p;
  }
  /** Fully allocated raw full of zero bytes. */
  zeroes(size = 1 << 20, name = "zeroes.raw"): string {
    const p = this.path(name);
    writeFileSync(p, new Uint8Array(size));
    return p;
  }
  dispose(): Promise<void> {
    return this.dir.dispose();
  }
}
