/** Ordered async before-write notifier lists and byte-range request tracking (serialising requests, drain). */
export {};
