import { expect, it } from "vitest";
import { NotifierList, RequestTracker } from "../src/index.ts";

it("README example", async () => {
  // A node's request path: before-write notifiers, then overlapping requests serialised by a tracker.
  const tracker = new RequestTracker();
  const beforeWrite = new NotifierList<{ offset: number; bytes: number }>();
  const log: string[] = [];

  // A copy-before-write hook: copy the old data of whole 64 KiB clusters out first, as a serialising request.
  beforeWrite.add(async ({ offset, bytes }) => {
    const copy = tracker.begin({ offset, bytes, serialising: true, alignment: 65536, kind: "copy" });
    await copy.waitForOverlapping();
    log.push(`copy [${copy.overlapOffset}, +${copy.overlapBytes})`);
    copy.end();
  });

  async function write(offset: number, bytes: number): Promise<void> {
    await beforeWrite.notify({ offset, bytes });
    const req = tracker.begin({ offset, bytes, kind: "write" });
    try {
      await req.waitForOverlapping();
      log.push(`write [${offset}, +${bytes})`);
    } finally {
      req.end();
    }
  }

  await Promise.all([write(4096, 512), write(70000, 100)]);
  await tracker.drain();
  expect(log).toEqual([
    "copy [0, +65536)",
    "copy [65536, +65536)",
    "write [4096, +512)",
    "write [70000, +100)",
  ]);
});
