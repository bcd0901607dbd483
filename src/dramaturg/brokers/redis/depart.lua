-- Forgets a worker that stops cleanly, if it claims nothing any more: its heartbeat leaves
-- the heartbeats, so that no other worker takes it for dead later and looks for its claims
-- (a SCAN of the whole keyspace, see recovery.py). A claim left (a task still running past
-- the shutdown timeout) keeps the heartbeat, for the others to recover it once it is old.
-- KEYS: heartbeats, then the worker's claim sets; ARGV: worker id. Returns 1 if forgotten.
for i = 2, #KEYS do
    if redis.call("scard", KEYS[i]) > 0 then
        return 0
    end
end
redis.call("zrem", KEYS[1], ARGV[1])
return 1
