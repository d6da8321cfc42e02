-- What is kept about a grant beside its tokens (SPEC 11), not secret:
-- `extra`, a JSON object of what the provider returned that an API needs
-- (Intuit realmId, Salesforce instance_url, Zoho api_domain, Xero tenants);
-- when the refresh token dies (UTC ms), and the end no refresh pushes back.
ALTER TABLE connections ADD COLUMN extra TEXT;
ALTER TABLE connections ADD COLUMN refresh_token_expires_at BIGINT;
ALTER TABLE connections ADD COLUMN refresh_token_cap_at BIGINT;
