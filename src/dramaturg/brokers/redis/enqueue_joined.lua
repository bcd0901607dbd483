-- Enqueues a new message that joins a batch, in one step: the join as batch.lua's "add"
-- (``batch``, batch.lua prepended by broker.py: the batch's total counts the member once,
-- by message id), then the enqueue as Dramatiq's dispatch script's (the body in
-- <queue>.msgs, the id at the tail of <queue>). A batch that is gone (expired) gets no
-- member, and nothing is enqueued.
-- KEYS: queue list, queue bodies; ARGV: Redis id, body, batch keys' prefix, batch id,
-- member id. Returns 1 if it was enqueued, -1 if the batch is gone.
if batch({ARGV[3]}, {"add", ARGV[4], ARGV[5]}) == -1 then
    return -1
end
redis.call("hset", KEYS[2], ARGV[1], ARGV[2])
redis.call("rpush", KEYS[1], ARGV[1])
return 1
