import { describe, expect, it } from "vitest";
import {
  BlkError,
  type BlockDriver,
  BlockGraph,
  type BlockNode,
  backendParent,
  FilterDriverState,
  filterDriver,
  jobParent,
  MemoryDriver,
  memoryDriver,
  PERM,
} from "../src/index.ts";

/** A format driver that stores data straight in its `file` child (permissions like qcow2's). */
const fmt: BlockDriver<Record<string, never>> = {
  format: "x-test-format",
  kind: "format",
  async open(_o, ctx) {
    const file = ctx.children.get("file");
    if (file === undefined) throw new BlkError("EINVAL", "Parameter 'file' is missing");
    return new FilterDriverState(file);
  },
};

const RW = PERM.CONSISTENT_READ | PERM.WRITE;
const ALL_BUT_RESIZE = PERM.CONSISTENT_READ | PERM.WRITE | PERM.WRITE_UNCHANGED;

async function disk(graph: BlockGraph, name: string, size = 1 << 20) {
  return graph.open(memoryDriver, { size }, { nodeName: name });
}

describe("node names", () => {
  it("QEMU's rules and messages", async () => {
    const g = new BlockGraph();
    await expect(disk(g, "1x")).rejects.toThrow("Invalid node-name: '1x'");
    await expect(disk(g, "a b")).rejects.toThrow("Invalid node-name: 'a b'");
    await expect(disk(g, "a".repeat(32))).rejects.toThrow("Node name too long");
    await disk(g, "a".repeat(31));
    await disk(g, "a-b.c_d9");
    await expect(disk(g, "a-b.c_d9")).rejects.toThrow("Duplicate nodes with node-name='a-b.c_d9'");
  });

  it("generated names look like #blockNNNRR", async () => {
    let r = 0.56;
    const g = new BlockGraph({ random: () => r });
    const a = await g.open(memoryDriver, { size: 512 });
    r = 0.07;
    const b = await g.open(memoryDriver, { size: 512 });
    expect(a.nodeName).toBe("#block00056");
    expect(b.nodeName).toBe("#block00107");
    expect(g.find(a.nodeName)).toBe(a);
    expect(g.list()).toEqual([b, a]);
  });
});

describe("permissions", () => {
  it("format on file: edge permissions as QEMU shows them in x-debug-query-block-graph", async () => {
    const g = new BlockGraph();
    const file = await disk(g, "disk-file");
    const d = await g.open(fmt, {}, { nodeName: "disk", children: { file } });
    const idle = g.debugGraph().edges[0];
    expect(idle).toMatchObject({
      name: "file",
      perm: ["resize", "write", "consistent-read"],
      "shared-perm": ["write-unchanged", "consistent-read"],
    });
    g.attach(backendParent(), d, { name: "root", perm: RW, shared: ALL_BUT_RESIZE });
    const info = g.debugGraph();
    expect(info.nodes).toEqual([
      { id: 1, type: "block-backend", name: "" },
      { id: 2, type: "block-driver", name: "disk" },
      { id: 3, type: "block-driver", name: "disk-file" },
    ]);
    expect(info.edges).toEqual([
      {
        parent: 1,
        child: 2,
        name: "root",
        perm: ["write", "consistent-read"],
        "shared-perm": ["write-unchanged", "write", "consistent-read"],
      },
      {
        parent: 2,
        child: 3,
        name: "file",
        perm: ["resize", "write", "consistent-read"],
        "shared-perm": ["write-unchanged", "consistent-read"],
      },
    ]);
  });

  it("two formats on one file conflict with QEMU's message; nothing changes", async () => {
    const g = new BlockGraph();
    const f = await disk(g, "f");
    await g.open(fmt, {}, { nodeName: "a", children: { file: f } });
    await expect(g.open(fmt, {}, { nodeName: "b", children: { file: f } })).rejects.toThrow(
      "Permission conflict on node 'f': permissions 'write, resize' are both required by node 'a' (uses node 'f' as 'file' child) and unshared by node 'b' (uses node 'f' as 'file' child).",
    );
    expect(f.parents.length).toBe(1);
    expect(g.find("b")).toBeUndefined();
  });

  it("a writable export beside a device that does not share write", async () => {
    const g = new BlockGraph();
    const n = await disk(g, "null");
    g.attach(backendParent("sdb"), n, {
      name: "root",
      perm: RW,
      shared: PERM.CONSISTENT_READ | PERM.WRITE_UNCHANGED,
    });
    let err: unknown;
    try {
      g.attach(backendParent(), n, { name: "root", perm: RW, shared: ALL_BUT_RESIZE });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(BlkError);
    expect((err as BlkError).code).toBe("EPERM");
    expect((err as BlkError).message).toBe(
      "Permission conflict on node 'null': permissions 'write' are both required by an unnamed block device (uses node 'null' as 'root' child) and unshared by block device 'sdb' (uses node 'null' as 'root' child).",
    );
    expect(n.parents.length).toBe(1);
    // A read-only export is fine.
    g.attach(backendParent(), n, { name: "root", perm: PERM.CONSISTENT_READ, shared: ALL_BUT_RESIZE });
  });

  it("jobs are named in messages; setPerm rolls back on conflict", async () => {
    const g = new BlockGraph();
    const t = await disk(g, "t");
    const job = g.attach(jobParent("mirror", "j0"), t, {
      name: "target",
      perm: 0,
      shared: PERM_ALL_BUT_WRITE(),
    });
    const exp = g.attach(backendParent(), t, {
      name: "root",
      perm: PERM.CONSISTENT_READ,
      shared: ALL_BUT_RESIZE,
    });
    expect(() => exp.setPerm(RW, ALL_BUT_RESIZE)).toThrow(
      "Permission conflict on node 't': permissions 'write' are both required by an unnamed block device (uses node 't' as 'root' child) and unshared by mirror job 'j0' (uses node 't' as 'target' child).",
    );
    expect(exp.perm).toBe(PERM.CONSISTENT_READ);
    job.detach();
    exp.setPerm(RW, ALL_BUT_RESIZE);
    expect(exp.perm).toBe(RW);
  });

  it("write permission on a read-only node: `Block node is read-only`", async () => {
    const g = new BlockGraph();
    const ro = await g.open(memoryDriver, { size: 512 }, { nodeName: "ro", readOnly: true });
    expect(() => g.attach(backendParent(), ro, { name: "root", perm: RW })).toThrow(
      "Block node is read-only",
    );
    g.attach(backendParent(), ro, { name: "root", perm: PERM.CONSISTENT_READ });
    // A format above a read-only file must be read-only too.
    await expect(g.open(fmt, {}, { nodeName: "f", children: { file: ro } })).rejects.toThrow(
      "Block node is read-only",
    );
    const f = await g.open(fmt, {}, { nodeName: "f", readOnly: true, children: { file: ro } });
    expect(f.children.get("file")?.perm).toBe(PERM.CONSISTENT_READ);
  });

  it("force-share makes every node parent share everything", async () => {
    const g = new BlockGraph();
    const f = await g.open(memoryDriver, { size: 512 }, { nodeName: "f", readOnly: true, forceShare: true });
    await g.open(fmt, {}, { nodeName: "a", readOnly: true, children: { file: f } });
    expect(f.parents[0]?.shared).toBe(0x0f);
    g.attach(backendParent(), f, { name: "root", perm: PERM.CONSISTENT_READ });
  });

  it("I/O through an edge needs the edge's permission; resize lets writes grow the child", async () => {
    const g = new BlockGraph();
    const file = await disk(g, "file", 65536);
    const exp = g.attach(backendParent(), file, { name: "root", perm: PERM.CONSISTENT_READ });
    await expect(exp.write(0, new Uint8Array(1))).rejects.toMatchObject({ code: "EPERM" });
    expect((await exp.read(0, 1)).length).toBe(1);
    const d = await g.open(fmt, {}, { nodeName: "d", children: { file } });
    const edge = d.children.get("file");
    await edge?.write(65536, new Uint8Array(512).fill(4));
    expect(file.length).toBe(65536 + 512);
    await expect(file.write(file.length, new Uint8Array(1))).rejects.toMatchObject({ code: "EIO" });
  });

  it("lock hooks: checkPerm refusals abort the change and leave nothing applied", async () => {
    const calls: string[] = [];
    class Locked extends MemoryDriver {
      checkPerm(perm: number, shared: number): void {
        calls.push(`check ${perm}/${shared}`);
        if ((perm & PERM.WRITE) !== 0) throw new BlkError("EAGAIN", 'Failed to get "write" lock');
      }
      setPerm(perm: number, shared: number): void {
        calls.push(`set ${perm}/${shared}`);
      }
      abortPerm(): void {
        calls.push("abort");
      }
    }
    const locked: BlockDriver<{ size: number }> = {
      format: "file",
      kind: "protocol",
      open: async (o) => new Locked(o),
    };
    const g = new BlockGraph();
    const f = await g.open(locked, { size: 512 }, { nodeName: "f" });
    expect(calls).toEqual(["check 0/15", "set 0/15"]);
    calls.length = 0;
    expect(() => g.attach(backendParent(), f, { name: "root", perm: RW })).toThrow(
      'Failed to get "write" lock',
    );
    expect(calls).toEqual(["check 3/15", "abort", "check 0/15", "set 0/15"]);
    expect(f.parents).toEqual([]);
    calls.length = 0;
    g.attach(backendParent(), f, { name: "root", perm: PERM.CONSISTENT_READ, shared: 5 });
    expect(calls).toEqual(["check 1/5", "set 1/5"]);
  });
});

describe("graph changes", () => {
  it("a replaced node's parents all see the new node", async () => {
    const g = new BlockGraph();
    const old = await disk(g, "old");
    const neu = await disk(g, "new");
    await neu.write(0, new Uint8Array(512).fill(0x77));
    const exp = g.attach(backendParent(), old, { name: "root", perm: RW, shared: ALL_BUT_RESIZE });
    const f = await g.open(filterDriver(), {}, { nodeName: "flt", children: { file: old } });
    g.replaceNode(old, neu);
    expect(exp.child).toBe(neu);
    expect(f.children.get("file")?.child).toBe(neu);
    expect(old.parents).toEqual([]);
    expect(neu.parents.length).toBe(2);
    expect((await exp.read(0, 1))[0]).toBe(0x77);
    expect((await f.read(0, 1))[0]).toBe(0x77);
  });

  it("job edges stay at their node when it is replaced", async () => {
    const g = new BlockGraph();
    const src = await disk(g, "src");
    const dst = await disk(g, "dst");
    const exp = g.attach(backendParent(), src, { name: "root", perm: RW, shared: ALL_BUT_RESIZE });
    const job = g.attach(jobParent("mirror", "m0"), src, { name: "source", perm: 0, shared: 0x0f });
    g.replaceNode(src, dst);
    expect(exp.child).toBe(dst);
    expect(job.child).toBe(src);
  });

  it("replace refuses a conflict and leaves the graph as it was", async () => {
    const g = new BlockGraph();
    const a = await disk(g, "a");
    const b = await disk(g, "b");
    const exp = g.attach(backendParent("dev"), a, { name: "root", perm: RW, shared: ALL_BUT_RESIZE });
    g.attach(jobParent("mirror", "j"), b, { name: "target", perm: PERM.WRITE, shared: PERM.WRITE_UNCHANGED });
    expect(() => g.replaceNode(a, b)).toThrow("Permission conflict on node 'b'");
    expect(exp.child).toBe(a);
    expect(b.parents.length).toBe(1);
  });

  it("insert a filter above a node (taking over all parents), then remove it", async () => {
    const g = new BlockGraph();
    const src = await disk(g, "src");
    const exp = g.attach(backendParent(), src, { name: "root", perm: RW, shared: ALL_BUT_RESIZE });
    const top = await g.openFilterAbove(filterDriver("mirror_top"), {}, src, {
      nodeName: "mtop",
      childName: "backing",
    });
    expect(exp.child).toBe(top);
    expect(src.parents.map((e) => e.name)).toEqual(["backing"]);
    expect(top.children.get("backing")?.perm).toBe(RW);
    await exp.write(0, new Uint8Array(512).fill(3));
    expect((await src.read(0, 1))[0]).toBe(3);
    expect(await top.blockStatusAbove(0, 65536)).toEqual([
      { offset: 0, length: 65536, data: true, zero: false, allocated: true, depth: 0 },
    ]);
    await g.removeFilter(top);
    expect(exp.child).toBe(src);
    expect(g.find("mtop")).toBeUndefined();
    expect(top.closed).toBe(true);
    expect(src.parents.length).toBe(1);
  });

  it("requests held by a drained section follow their edge to a filter inserted in it", async () => {
    const g = new BlockGraph();
    const src = await disk(g, "src");
    const exp = g.attach(backendParent(), src, { name: "root", perm: RW, shared: ALL_BUT_RESIZE });
    let top: BlockNode | undefined;
    const seen: string[] = [];
    const held: Promise<unknown>[] = [];
    await src.drained(async () => {
      // Issued while drained: they wait at src's gate, having already chosen src as their node.
      held.push(exp.write(0, new Uint8Array(512).fill(7)), exp.readInto(512, new Uint8Array(512)));
      held.push(exp.writeZeroes(1024, 512), exp.discard(1536, 512));
      top = await g.openFilterAbove(filterDriver("cbw"), {}, src, { nodeName: "cbw" });
      top.beforeWrite.add(async (ev) => {
        seen.push(`${ev.kind}@${ev.offset}`);
      });
    });
    await Promise.all(held);
    expect(exp.child).toBe(top);
    // Both writes went through the filter (its before-write notifier saw them), as they would have if
    // they had waited above the graph; the read went there too and found the data below.
    expect(seen.sort()).toEqual(["write-zeroes@1024", "write@0"]);
    expect(top?.stats.rd_operations).toBe(1);
    expect(src.stats.rd_operations).toBe(1);
    expect((await src.read(0, 1))[0]).toBe(7);
  });

  it("a filter that cannot be put above a node leaves the graph as it was", async () => {
    const g = new BlockGraph();
    const src = await disk(g, "src");
    const other = await disk(g, "other");
    expect(() => g.insertFilter(other, src)).toThrow("'other' is not a parent of 'src'");
    const dev = g.attach(backendParent("dev"), src, {
      name: "root",
      perm: PERM.CONSISTENT_READ,
      shared: 0x0f,
    });
    g.attach(jobParent("stream", "s0"), src, { name: "x", perm: 0, shared: PERM.CONSISTENT_READ });
    const writing = { ...filterDriver("cbw"), childPerm: () => ({ perm: RW, shared: 0x0f }) };
    await expect(g.openFilterAbove(writing, {}, src, { nodeName: "cbw" })).rejects.toThrow(
      "Permission conflict on node 'src': permissions 'write' are both required by node 'cbw' (uses node 'src' as 'file' child) and unshared by stream job 's0' (uses node 'src' as 'x' child).",
    );
    expect(dev.child).toBe(src);
    expect(g.find("cbw")).toBeUndefined();
    expect(src.parents.length).toBe(2);
  });

  it("delete: refuses a node in use, deletes inline children with their parent, refuses cycles", async () => {
    const g = new BlockGraph();
    const file = await g.open(memoryDriver, { size: 512 }, { owned: false });
    const d = await g.open(fmt, {}, { nodeName: "d", children: { file } });
    await expect(g.delete(file)).rejects.toThrow(`Node ${file.nodeName} is in use`);
    const f2 = await disk(g, "f2");
    const d2 = await g.open(fmt, {}, { nodeName: "d2", children: { file: f2 } });
    expect(() => g.attach(f2, d2, { name: "backing" })).toThrow(
      "Making 'd2' a backing child of 'f2' would create a cycle",
    );
    await g.delete(d);
    expect(g.find(file.nodeName)).toBeUndefined();
    expect(file.closed).toBe(true);
    await g.delete(d2);
    expect(g.find("f2")).toBe(f2);
  });
});

function PERM_ALL_BUT_WRITE(): number {
  return PERM.CONSISTENT_READ | PERM.WRITE_UNCHANGED | PERM.RESIZE;
}
