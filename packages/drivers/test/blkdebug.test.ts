import { BlockGraph, type BlockNode, backendParent, type Edge, memoryDriver, PERM } from "@blk/core";
import { describe, expect, it } from "vitest";
import {
  BLKDEBUG_CHILD_ROLE,
  type BlkdebugOptions,
  type BlkdebugState,
  blkdebugDriver,
  blkdebugSchema,
  codeOfErrno,
} from "../src/blkdebug/index.ts";

async function setup(
  options: BlkdebugOptions = {},
): Promise<{ dbg: BlockNode; state: BlkdebugState; root: Edge }> {
  const graph = new BlockGraph();
  const mem = await graph.open(memoryDriver, { size: 1 << 20 }, { owned: false });
  const dbg = await graph.open(blkdebugDriver, blkdebugSchema.parse(options), {
    discard: "unmap",
    children: { image: { node: mem, role: BLKDEBUG_CHILD_ROLE } },
  });
  const root = graph.attach(backendParent(), dbg, { name: "root", perm: PERM.CONSISTENT_READ | PERM.WRITE });
  return { dbg, state: dbg.state as BlkdebugState, root };
}

const outcome = (p: Promise<unknown>): Promise<string> =>
  p.then(
    () => "ok",
    (e: unknown) => (e as { code: string }).code,
  );

describe("blkdebug", () => {
  it("fails exactly the N-th write with the chosen errno and nothing else", async () => {
    const { state, root } = await setup();
    const h = state.inject({ on: "write", nth: 3, errno: "ENOSPC" });
    const results: string[] = [];
    for (let i = 0; i < 6; i++) {
      results.push(await outcome(root.write(i * 4096, new Uint8Array(4096).fill(i + 1))));
      results.push(await outcome(root.read(i * 4096, 4096)));
      results.push(await outcome(root.flush()));
    }
    expect(results.filter((r) => r !== "ok")).toEqual(["ENOSPC"]);
    expect(results[6]).toBe("ENOSPC"); // third write
    expect(h.hits).toBe(1);
    // The failed write never reached the image.
    expect((await root.read(2 * 4096, 4096)).every((b) => b === 0)).toBe(true);
    expect((await root.read(3 * 4096, 4096)).every((b) => b === 4)).toBe(true);
  });

  it("fails any access to a byte range, always, until removed", async () => {
    const { state, root } = await setup();
    const h = state.inject({ range: { offset: 65536, bytes: 512 }, errno: "EIO" });
    expect(await outcome(root.read(65536 + 100, 10))).toBe("EIO");
    expect(await outcome(root.write(65000, new Uint8Array(1000)))).toBe("EIO");
    expect(await outcome(root.writeZeroes(65536, 4096))).toBe("EIO");
    expect(await outcome(root.discard(0, 1 << 20))).toBe("EIO");
    expect(await outcome(root.read(0, 65536))).toBe("ok");
    expect(await outcome(root.read(65536 + 512, 512))).toBe("ok");
    expect(await outcome(root.flush())).toBe("ok");
    expect(h.hits).toBe(4);
    h.remove();
    expect(await outcome(root.read(65536, 512))).toBe("ok");
  });

  it("QEMU inject-error: event write_aio, errno 5, once", async () => {
    const { root } = await setup({ "inject-error": [{ event: "write_aio", errno: 5, once: true }] });
    expect(await outcome(root.read(0, 512))).toBe("ok");
    expect(await outcome(root.write(0, new Uint8Array(512)))).toBe("EIO");
    expect(await outcome(root.write(0, new Uint8Array(512)))).toBe("ok");
  });

  it("QEMU inject-error: iotype and sector, not once", async () => {
    const { root } = await setup({
      "inject-error": [{ event: "read_aio", iotype: "read", sector: 8, errno: 28 }],
    });
    expect(await outcome(root.read(0, 4096))).toBe("ok"); // activates, covers sectors 0-7
    expect(await outcome(root.read(4096, 512))).toBe("ENOSPC");
    expect(await outcome(root.read(4096, 512))).toBe("ENOSPC");
    expect(await outcome(root.write(4096, new Uint8Array(512)))).toBe("ok");
  });

  it("validates options with QEMU's wording", () => {
    expect(() => blkdebugSchema.parse({ "inject-error": [{ errno: 5 }] })).toThrow(
      "Parameter 'event' is missing",
    );
    expect(() => blkdebugSchema.parse({ "inject-error": [{ event: "bogus" }] })).toThrow(
      "Parameter 'event' does not accept value 'bogus'",
    );
    expect(() => blkdebugSchema.parse({ "inject-error": [{ event: "write_aio", iotype: "x" }] })).toThrow(
      "Parameter 'iotype' does not accept value 'x'",
    );
    expect(codeOfErrno(28)).toBe("ENOSPC");
    expect(codeOfErrno(9999)).toBe("EIO");
  });

  it("set-state changes the state and gates rules", async () => {
    const { state, root } = await setup({
      "set-state": [{ event: "flush_to_disk", state: 1, new_state: 2 }],
      "inject-error": [{ event: "write_aio", state: 2, errno: 5 }],
    });
    expect(await outcome(root.write(0, new Uint8Array(512)))).toBe("ok");
    await root.flush();
    expect(state.debugState).toBe(2);
    expect(await outcome(root.write(0, new Uint8Array(512)))).toBe("EIO");
  });
});
