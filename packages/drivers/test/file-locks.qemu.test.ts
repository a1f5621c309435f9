import { readFileSync, writeFileSync } from "node:fs";
import { truncate } from "node:fs/promises";
import { BlockGraph, backendParent, PERM, PERM_ALL } from "@blk/core";
import { makeTempDir, missingPeers, run, spawnPeer } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { fileDriver, ImageLockError } from "../src/file/index.ts";
import { rawChildRole, rawDriver } from "../src/raw/index.ts";

const dir = makeTempDir("blk-lock");
afterAll(() => dir.dispose());
let n = 0;

async function image(size = 1 << 20): Promise<string> {
  const p = dir.join(`l${n++}.img`);
  writeFileSync(p, "");
  await truncate(p, size);
  return p;
}

const CR = PERM.CONSISTENT_READ;
const W = PERM.WRITE;
const WU = PERM.WRITE_UNCHANGED;
const RS = PERM.RESIZE;

const missing = missingPeers(["qemu-io", "qemu-img"]);
if (missing.length > 0) console.warn(`skipping qemu lock interop: missing ${missing.join(", ")}`);

// `pnpm test:fast` leaves this file out by its name (`*.qemu.test.ts`); it skips itself when a peer is missing.
describe.skipIf(missing.length > 0)("file image locks interop with qemu-io", () => {
  it("qemu-io cannot write while blk holds the image writable without sharing write", async () => {
    const p = await image();
    const graph = new BlockGraph();
    const node = await graph.open(fileDriver, { filename: p });
    const edge = graph.attach(backendParent(), node, { name: "root", perm: CR | W | RS, shared: CR | WU });
    const r = await run("qemu-io", ["-f", "raw", "-c", "write 0 512", p], { timeoutMs: 20_000 });
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(
      `qemu-io: can't open device ${p}: Failed to get "write" lock\nIs another process using the image [${p}]?\n`,
    );
    // A read-only qemu-io that shares everything may still read.
    const ro = await run("qemu-io", ["-f", "raw", "-r", "-c", "read 0 512", p], { timeoutMs: 20_000 });
    expect(ro.code).toBe(0);
    edge.detach();
    const ok = await run("qemu-io", ["-f", "raw", "-c", "write 0 512", p], { timeoutMs: 20_000 });
    expect(ok.code).toBe(0);
    await graph.delete(node);
  });

  it("blk refuses an image a QEMU process holds", async () => {
    const p = dir.join(`q${n++}.qcow2`);
    const c = await run("qemu-img", ["create", "-q", "-f", "qcow2", p, "1M"]);
    expect(c.code).toBe(0);
    // qemu-io with a qcow2 node on the file: holds consistent-read/write/resize, shares neither write nor resize.
    const peer = await spawnPeer("qemu-io", ["-f", "qcow2", p], {
      timeoutMs: 30_000,
      ready: (out) => out.includes("qemu-io>"),
    });
    try {
      const graph = new BlockGraph();
      const node = await graph.open(fileDriver, { filename: p });
      let err: unknown;
      try {
        graph.attach(backendParent(), node, { name: "root", perm: CR | W, shared: PERM_ALL });
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(ImageLockError);
      expect((err as ImageLockError).code).toBe("EAGAIN");
      expect((err as ImageLockError).message).toBe('Failed to get "write" lock');
      expect((err as ImageLockError).hint).toBe(`Is another process using the image [${p}]?`);
      // Unsharing write (as a qcow2 reader would) conflicts with QEMU's write.
      expect(() => graph.attach(backendParent(), node, { name: "r", perm: CR, shared: CR | WU })).toThrow(
        'Failed to get shared "write" lock',
      );
      // Reading and sharing everything (force-share style) works.
      graph.attach(backendParent(), node, { name: "ok", perm: CR, shared: PERM_ALL });
      await graph.delete(node, { force: true });

      // A force-share read-only file node shares all permissions with the format node above it.
      const g2 = new BlockGraph();
      const fs = await g2.open(fileDriver, { filename: p }, { readOnly: true, forceShare: true });
      const raw = await g2.open(
        rawDriver,
        {},
        {
          readOnly: true,
          children: { file: { node: fs, role: rawChildRole() } },
        },
      );
      g2.attach(backendParent(), raw, { name: "root", perm: CR, shared: CR });
      expect((await raw.read(0, 4)).length).toBe(4);
      await g2.delete(raw, { force: true });
      await g2.delete(fs, { force: true });

      // Creating over it is refused before anything is destroyed (QEMU's create takes write+resize first).
      const before = readFileSync(p);
      const err2 = await fileDriver.create({ filename: p, size: 4096 }).catch((e: unknown) => e);
      expect(err2).toBeInstanceOf(ImageLockError);
      expect((err2 as ImageLockError).message).toBe('Failed to get "write" lock');
      expect(readFileSync(p).equals(before)).toBe(true);
    } finally {
      await peer.stop();
    }
  });
});
