// Reopening a qcow2 node between read-only and read-write, as a commit job does with its base.
import { isBlkError } from "@blk/core";
import { makeTempDir, missingPeers, run } from "@blk/testkit";
import { expect, it } from "vitest";
import { openImage } from "../src/index.ts";
import { createQcow2, openQcow2 } from "../src/qcow2/index.ts";

it("a read-only qcow2 node becomes writable after reopen, and read-only again", async () => {
  await using dir = makeTempDir("qcow2-reopen");
  const path = dir.join("a.qcow2");
  await createQcow2({ filename: path, size: 1 << 20 });
  await using img = await openQcow2(path);
  const data = new Uint8Array(4096).fill(0x5a);
  const refused = await img.node.write(0, data).catch((e: unknown) => e);
  expect(isBlkError(refused)).toBe(true);
  const file = img.node.children.get("file")?.child;
  expect(file).toBeDefined();
  await file?.reopen({ readOnly: false });
  await img.node.reopen({ readOnly: false });
  await img.node.write(0, data);
  expect((await img.node.read(0, 4096))[100]).toBe(0x5a);
  await img.node.reopen({ readOnly: true });
  const again = await img.node.write(4096, data).catch((e: unknown) => e);
  expect(isBlkError(again, "EROFS") || isBlkError(again, "EPERM")).toBe(true);
  await img.close();
  if (missingPeers(["qemu-img", "qemu-io"]).length === 0) {
    expect((await run("qemu-img", ["check", path])).code).toBe(0);
    const io = await run("qemu-io", ["-f", "qcow2", "-c", "read -P 0x5a 0 4k", path]);
    expect(io.stdout).not.toMatch(/Pattern verification failed/);
  }
});

it("openImage passes cache.no-flush to a qcow2 image and its file node (qemu-img convert's unsafe target)", async () => {
  await using dir = makeTempDir("qcow2-noflush");
  const path = dir.join("b.qcow2");
  await createQcow2({ filename: path, size: 1 << 20 });
  await using img = await openImage(path, { cacheNoFlush: true });
  expect(img.format).toBe("qcow2");
  expect(img.node.options.cacheNoFlush).toBe(true);
  expect(img.node.children.get("file")?.child.options.cacheNoFlush).toBe(true);
  await img.root.write(0, new Uint8Array(65536).fill(1));
  await img.root.flush();
});
