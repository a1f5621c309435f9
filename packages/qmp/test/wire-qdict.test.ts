import { describe, expect, it } from "vitest";
import { firstUnexpectedMember, qdictKeyOrder } from "../src/index.ts";

// Expected values observed on qemu-storage-daemon 7.2.22 (see also the member-order cases of qsd-hostile.ts).
describe("QEMU's member order", () => {
  it("qdictKeyOrder follows QDict buckets, newest first within a bucket", () => {
    expect(qdictKeyOrder(["execute", "extra", "id"])[0]).toBe("extra");
    expect(qdictKeyOrder(["arguments", "execute"])[0]).toBe("execute");
    expect(qdictKeyOrder(["aa", "aq"])[0]).toBe("aq"); // same bucket
    expect(qdictKeyOrder(["aq", "aa"])[0]).toBe("aa");
    expect(qdictKeyOrder(["b", "a", "c"]).sort()).toEqual(["a", "b", "c"]);
  });

  it("firstUnexpectedMember follows the GLib table of the QAPI input visitor", () => {
    expect(firstUnexpectedMember([])).toBeUndefined();
    expect(firstUnexpectedMember(["only"])).toBe("only");
    expect(firstUnexpectedMember(["device"], ["device"])).toBeUndefined();
    expect(firstUnexpectedMember(["aa", "aq"])).toBe("aa");
    expect(firstUnexpectedMember(["zzz", "x"])).toBe("zzz");
    expect(firstUnexpectedMember(["ar", "ab", "as", "ac"])).toBe("ac");
    expect(firstUnexpectedMember(["enable", "x"], ["enable"])).toBe("x");
    // large enough to resize the table on the way up and again while visited members are removed
    const keys = [
      "gw",
      "immrbv",
      "device",
      "jhyi",
      "oy_ly",
      "rpypj",
      "xnbh",
      "xm_ox_p",
      "q",
      "ybmdi",
      "d",
      "ofw",
    ];
    const more = ["esrypr-g", "hyiq", "vde", "lu", "_lge", "fksetsit", "speed"];
    expect(firstUnexpectedMember([...keys, ...more], ["device", "speed"])).toBe("fksetsit");
    expect(firstUnexpectedMember(["shgwj", "eylbt-", "dtal", "ooyj", "scnsqi"])).toBe("ooyj");
  });
});
