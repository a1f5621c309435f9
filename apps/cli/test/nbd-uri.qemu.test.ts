// NBD URIs wherever blk-img takes a filename, side by side with qemu-img against the same qemu-nbd exports:
// info, map and compare of an export, convert from an export, convert onto an export (QEMU's create
// fallback: the export must open and be large enough), and the errors when it does not.
import { existsSync } from "node:fs";
import { missingPeers, type Peer, run, spawnPeer } from "@blk/testkit";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { blk } from "./helpers.ts";
import { both, Fixtures, qemu } from "./qemu.ts";

const missing = missingPeers(["qemu-img", "qemu-io", "qemu-nbd"]);

describe.skipIf(missing.length > 0)("NBD URIs as filenames", () => {
  const fx = new Fixtures("blk-img-nbd-uri");
  const peers: Peer[] = [];
  let src = "";
  let small = "";
  let target = "";
  let srcImage = "";
  let targetImage = "";

  /** A persistent qemu-nbd export of `file` (format `fmt`) named `t`; returns its URI. */
  async function serve(file: string, fmt: string, name: string, readOnly: boolean): Promise<string> {
    const sock = fx.dir.join(`${name}.sock`);
    const args = ["--persistent", "-f", fmt, "-k", sock, "-x", "t", ...(readOnly ? ["-r"] : []), file];
    peers.push(await spawnPeer("qemu-nbd", args, { ready: () => existsSync(sock) }));
    return `nbd+unix:///t?socket=${sock}`;
  }

  beforeAll(async () => {
    srcImage = fx.path("src.qcow2");
    await qemu(["create", "-q", "-f", "qcow2", srcImage, "4M"]);
    const w = await run("qemu-io", [
      "-f",
      "qcow2",
      "-c",
      "write -P 0x5a 1M 64k",
      "-c",
      "write -z 2M 64k",
      srcImage,
    ]);
    expect(w.code).toBe(0);
    src = await serve(srcImage, "qcow2", "src", true);
    small = await serve(await fx.sparse("small.raw"), "raw", "small", false);
    targetImage = fx.path("target.raw");
    await qemu(["create", "-q", "-f", "raw", targetImage, "8M"]);
    target = await serve(targetImage, "raw", "target", false);
  });

  afterAll(async () => {
    for (const p of peers) await p.stop();
    await fx.dir.dispose();
  });

  it("info, map (human and JSON) and compare of an export read as qemu-img reads them", async () => {
    for (const argv of [
      ["info", src],
      ["info", "--output=json", src],
      ["map", src],
      ["map", "--output=json", src],
      ["compare", "-U", src, srcImage],
      ["compare", "-f", "raw", "-F", "qcow2", "-U", src, srcImage],
    ]) {
      const { q, b } = await both(argv);
      expect(b, argv.join(" ")).toEqual(q);
    }
  });

  it("convert from an export to qcow2 and raw gives qemu-img's images", async () => {
    for (const fmt of ["qcow2", "raw"]) {
      const qOut = fx.path(`q.${fmt}`);
      const bOut = fx.path(`b.${fmt}`);
      expect((await qemu(["convert", "-O", fmt, src, qOut])).code).toBe(0);
      expect(await blk(["convert", "-O", fmt, src, bOut])).toMatchObject({ code: 0, stderr: "" });
      expect((await qemu(["compare", "-U", qOut, bOut])).stdout).toBe("Images are identical.\n");
      const maps = await Promise.all([qOut, bOut].map((f) => qemu(["map", "--output=json", f])));
      expect(maps[1]?.stdout).toBe(maps[0]?.stdout);
    }
  });

  it("convert onto an export (with and without -n) writes it; a too small or absent export fails as in QEMU", async () => {
    expect(await blk(["convert", "-O", "raw", "-U", srcImage, target])).toMatchObject({ code: 0 });
    expect((await qemu(["compare", "-U", "-F", "raw", srcImage, targetImage])).stdout).toContain(
      "Images are identical.",
    );
    expect(await blk(["convert", "-n", "-O", "raw", "-U", srcImage, target])).toMatchObject({ code: 0 });
    const bigImage = fx.path("big.qcow2");
    await qemu(["create", "-q", "-f", "qcow2", bigImage, "16M"]);
    const gone = small.replace("small.sock", "none.sock");
    for (const argv of [
      ["convert", "-O", "raw", "-U", bigImage, small],
      ["convert", "-O", "raw", "-U", srcImage, gone],
    ]) {
      const { q, b } = await both(argv);
      expect(b, argv.join(" ")).toEqual(q);
      expect(b.code).toBe(1);
    }
  });
});
