import { readFileSync, writeFileSync } from "node:fs";
import { truncate } from "node:fs/promises";
import { BlockGraph, type BlockNode, backendParent, isBlkError, PERM, PERM_ALL } from "@blk/core";
import { makeTempDir } from "@blk/testkit";
import { afterAll, describe, expect, it } from "vitest";
import { type FileState, fileDriver, type ImageLockError, lockBytes } from "../src/file/index.ts";

const dir = makeTempDir("blk-lock");
afterAll(() => dir.dispose());
let n = 0;

async function image(size = 1 << 20): Promise<string> {
  const p = dir.join(`l${n++}.img`);
  writeFileSync(p, "");
  await truncate(p, size);
  return p;
}

/** Bytes of the OFD locks held through `fd` (from /proc/self/fdinfo, which lists the fd's own locks). */
function heldBytes(fd: number): number[] {
  const out: number[] = [];
  for (const line of readFileSync(`/proc/self/fdinfo/${fd}`, "utf8").split("\n")) {
    if (!line.startsWith("lock:")) continue;
    const f = line.trim().split(/\s+/);
    if (!f.includes("OFDLCK")) continue;
    const start = Number(f.at(-2));
    const end = Number(f.at(-1));
    for (let b = start; b <= end; b++) out.push(b);
  }
  return out.sort((a, b) => a - b);
}

const CR = PERM.CONSISTENT_READ;
const W = PERM.WRITE;
const WU = PERM.WRITE_UNCHANGED;
const RS = PERM.RESIZE;

describe("file image locks (in process)", () => {
  it("locks QEMU's bytes for the graph's permissions and releases them", async () => {
    const p = await image();
    const graph = new BlockGraph();
    const node = await graph.open(fileDriver, { filename: p });
    const state = node.state as FileState;
    expect(heldBytes(state.fd)).toEqual([]);
    const edge = graph.attach(backendParent(), node, { name: "root", perm: CR | W | RS, shared: CR | WU });
    expect(heldBytes(state.fd)).toEqual(lockBytes(CR | W | RS, CR | WU));
    expect(lockBytes(CR | W | RS, CR | WU)).toEqual([100, 101, 103, 201, 203]);
    edge.setPerm(CR, PERM_ALL);
    expect(heldBytes(state.fd)).toEqual([100]);
    edge.detach();
    expect(heldBytes(state.fd)).toEqual([]);
    await graph.delete(node);
  });

  it("two opens of one image conflict like two processes", async () => {
    const p = await image();
    const g1 = new BlockGraph();
    const g2 = new BlockGraph();
    const a = await g1.open(fileDriver, { filename: p });
    const b = await g2.open(fileDriver, { filename: p });
    g1.attach(backendParent(), a, { name: "root", perm: CR | W, shared: CR | WU });
    let err: unknown;
    try {
      g2.attach(backendParent(), b, { name: "root", perm: CR | W, shared: PERM_ALL });
    } catch (e) {
      err = e;
    }
    expect(isBlkError(err, "EAGAIN")).toBe(true);
    expect((err as Error).message).toBe('Failed to get "write" lock');
    expect((err as ImageLockError).hint).toBe(`Is another process using the image [${p}]?`);
    // Nothing was left locked by the refused attempt.
    expect(heldBytes((b.state as FileState).fd)).toEqual([]);
    // Reading while sharing everything is fine.
    g2.attach(backendParent(), b, { name: "ro", perm: CR, shared: PERM_ALL });
    // Unsharing write while the other holds write is refused.
    expect(() => g2.attach(backendParent(), b, { name: "x", perm: 0, shared: CR })).toThrow(
      'Failed to get shared "write" lock',
    );
    await g2.delete(b, { force: true });
    await g1.delete(a, { force: true });
  });

  it("locking=off takes no locks", async () => {
    const p = await image();
    const graph = new BlockGraph();
    const node: BlockNode = await graph.open(fileDriver, { filename: p, locking: "off" });
    graph.attach(backendParent(), node, { name: "root", perm: CR | W, shared: CR });
    expect(heldBytes((node.state as FileState).fd)).toEqual([]);
    await graph.delete(node, { force: true });
  });
});

describe("file reopen", () => {
  it("switches read-only to read-write and back, keeping the image locks", async () => {
    const p = await image();
    const graph = new BlockGraph();
    const node = await graph.open(fileDriver, { filename: p }, { readOnly: true });
    const state = node.state as FileState;
    const reader = graph.attach(backendParent(), node, { name: "r", perm: CR, shared: CR | WU });
    expect(heldBytes(state.fd)).toEqual([100, 201, 203]);
    await expect(node.write(0, new Uint8Array(1))).rejects.toMatchObject({ code: "EPERM" });
    await node.reopen({ readOnly: false });
    expect(state.readOnly).toBe(false);
    expect(heldBytes(state.fd)).toEqual([100, 201, 203]);
    await node.write(0, new Uint8Array([42]));
    expect((await node.read(0, 1))[0]).toBe(42);
    // A second opener of the file still sees the locks after the descriptor changed.
    const g2 = new BlockGraph();
    const other = await g2.open(fileDriver, { filename: p });
    expect(() => g2.attach(backendParent(), other, { name: "w", perm: CR | W, shared: PERM_ALL })).toThrow(
      'Failed to get "write" lock',
    );
    await g2.delete(other);
    await node.reopen({ readOnly: true });
    expect(state.readOnly).toBe(true);
    reader.detach();
    expect(heldBytes(state.fd)).toEqual([]);
    await graph.delete(node);
  });
});
