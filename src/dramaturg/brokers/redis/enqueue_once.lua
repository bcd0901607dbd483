-- Enqueues a copy of an enqueued message (a retry, a release, a delayed message now due)
-- under a Redis id derived from its source (see copy_id): a write run again, after its
-- reply was lost or timed out, finds its body there and queues nothing.
-- KEYS: queue list, queue bodies; ARGV: Redis id, body. Returns 1 if it was queued.
if redis.call("hsetnx", KEYS[2], ARGV[1], ARGV[2]) == 1 then
    redis.call("rpush", KEYS[1], ARGV[1])
    return 1
end
return 0
