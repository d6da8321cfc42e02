-- Every committed change of a connection that matters for serving (a new
-- grant or rotation, a state change, a lease taken or given up, a new
-- retry time, a forget) is announced on the channel
-- `tokenkeeper_connections` with the connection's id as payload. NOTIFY
-- inside a transaction is delivered only when it commits (and
-- duplicates within one transaction are sent once), so the other
-- daemons of the cluster re-read exactly what changed, at once. Lease
-- renewals (lease_until only) and heartbeats are not announced.
CREATE FUNCTION tokenkeeper_announce() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('tokenkeeper_connections', OLD.id::text);
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE'
       AND NEW.generation = OLD.generation
       AND NEW.state = OLD.state
       AND NEW.access_token = OLD.access_token
       AND NEW.lease_owner IS NOT DISTINCT FROM OLD.lease_owner
       AND NEW.attempt_id IS NOT DISTINCT FROM OLD.attempt_id
       AND NEW.next_attempt_at IS NOT DISTINCT FROM OLD.next_attempt_at
       AND NEW.last_error IS NOT DISTINCT FROM OLD.last_error THEN
        RETURN NEW;
    END IF;
    PERFORM pg_notify('tokenkeeper_connections', NEW.id::text);
    RETURN NEW;
END
$$;

CREATE TRIGGER connections_announce
    AFTER INSERT OR UPDATE OR DELETE ON connections
    FOR EACH ROW EXECUTE FUNCTION tokenkeeper_announce();
